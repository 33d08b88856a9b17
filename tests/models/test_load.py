import pytest
import torch

from selftune.errors import SelftuneError
from selftune.models.load import load_model, pick_dtype
from selftune.models.resolve import bare_name_hub_id, embedded_folder, resolve_model


def test_local_folder_loads(tiny_model_dir):
    model, tokenizer, folder = load_model(str(tiny_model_dir), device="cpu")
    assert folder == tiny_model_dir
    assert model.dtype == torch.float32
    assert tokenizer.pad_token_id is not None
    assert not model.training


def test_loading_reuses_a_given_tokenizer(tiny_model_dir):
    _, tokenizer, _ = load_model(str(tiny_model_dir), device="cpu")
    _, again, _ = load_model(str(tiny_model_dir), device="cpu", tokenizer=tokenizer)
    assert again is tokenizer


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_where_there_is_none_is_one_clear_line(tiny_model_dir):
    for device in ("cuda", "cuda:1"):
        with pytest.raises(SelftuneError, match=f"--device {device}: torch .* sees no CUDA GPU"):
            load_model(str(tiny_model_dir), device=device)


def test_torch_dtype_override(tiny_model_dir):
    model, _, _ = load_model(str(tiny_model_dir), torch_dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16


def test_missing_path_names_what_was_tried():
    with pytest.raises(SelftuneError) as err:
        resolve_model("/no/such/model")
    message = str(err.value)
    assert "/no/such/model" in message and "\n" not in message


def test_folder_without_config(tmp_path):
    with pytest.raises(SelftuneError, match="config.json"):
        resolve_model(str(tmp_path))


def test_missing_gguf(tmp_path):
    with pytest.raises(SelftuneError, match="GGUF"):
        resolve_model(str(tmp_path / "x.gguf"))


def test_bare_names_map_to_hub_ids():
    assert bare_name_hub_id("Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    assert bare_name_hub_id("Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"
    assert bare_name_hub_id("SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert bare_name_hub_id("unknownthing") is None


def test_bare_name_prefers_local_folder(tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tiny_model_dir.parent)
    assert resolve_model(tiny_model_dir.name) == tiny_model_dir.relative_to(tiny_model_dir.parent)


def test_hub_failure_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SelftuneError) as err:
        resolve_model("Qwen2.5-0.5B-Instruct")
    message = str(err.value)
    assert "Qwen/Qwen2.5-0.5B-Instruct" in message and "local folder" in message
    assert "\n" not in message


def test_dtype_defaults():
    assert pick_dtype(None, "cpu") == torch.float32
    assert pick_dtype("float16", "cpu") == torch.float16
    with pytest.raises(SelftuneError):
        pick_dtype("float17", "cpu")


@pytest.mark.slow
def test_embedded_model_is_cached():
    folder = embedded_folder()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("smollm2-135m") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    model, tokenizer, _ = load_model("smollm2-135m", device="cpu")
    assert model.config.model_type == "llama"
    assert "<|im_start|>" in tokenizer.chat_template
