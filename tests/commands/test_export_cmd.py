"""`selftune export` as a user runs it: the folders it writes, and one clear line when it cannot."""

import json
import subprocess
import sys

import pytest
import torch
from support import TINY_SYSTEM, make_adapter_checkpoint

from selftune.cli import main


@pytest.fixture()
def checkpoint(tmp_path, tiny_model_dir):
    return make_adapter_checkpoint(tiny_model_dir, tmp_path / "run" / "checkpoint-8")


def export(capsys, *flags):
    code = main(["export", *map(str, flags)])
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err):
    return [line for line in err.splitlines() if line.startswith("selftune: error")]


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_merge_writes_a_plain_hf_folder_beside_the_checkpoint(capsys, checkpoint, smol_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code, out, err = export(capsys, "--adapters", checkpoint, "--merge_lora", "true")
    assert code == 0, err
    merged = checkpoint.with_name("checkpoint-8-merged")
    assert f"to {merged}" in out
    names = set(p.name for p in merged.iterdir())
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert {"README.md", "chat_template.jinja"} <= names
    assert not any(p.name.startswith(".") for p in checkpoint.parent.iterdir())  # no temp left
    tokenizer = AutoTokenizer.from_pretrained(merged)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who are you?"}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith(f"<|im_start|>system\n{TINY_SYSTEM}<|im_end|>\n")
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.generation_config.eos_token_id == smol_tokenizer.eos_token_id
    assert "checkpoint-8" in (merged / "README.md").read_text()


def test_gguf_and_modelfile_go_to_their_own_folder(capsys, checkpoint):
    import gguf

    code, _, err = export(
        capsys,
        "--adapters",
        checkpoint,
        "--to_gguf",
        "true",
        "--gguf_type",
        "q8_0",
        "--to_ollama",
        "true",
    )
    assert code == 0, err
    folder = checkpoint.with_name("checkpoint-8-gguf")
    assert listing(folder) == ["Modelfile", "README.md", "model-q8_0.gguf"]
    assert (folder / "Modelfile").read_text().startswith("FROM ./model-q8_0.gguf\n")
    reader = gguf.GGUFReader(folder / "model-q8_0.gguf")
    assert reader.fields["general.name"].contents() == "Xinghe"
    assert TINY_SYSTEM in reader.fields["tokenizer.chat_template"].contents()


def test_merge_and_gguf_together_share_one_folder(capsys, checkpoint, tmp_path):
    output = tmp_path / "published"
    code, _, err = export(
        capsys,
        "--adapters",
        checkpoint,
        "--merge_lora",
        "true",
        "--to_gguf",
        "true",
        "--output_dir",
        output,
    )
    assert code == 0, err
    names = set(listing(output))
    assert {"model-f16.gguf", "model.safetensors", "config.json", "README.md"} <= names
    assert "Modelfile" not in names


def test_full_fine_tune_checkpoint_exports_too(capsys, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    checkpoint = tmp_path / "run" / "checkpoint-3"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.5)
    model.save_pretrained(checkpoint)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (checkpoint / name).write_bytes((tiny_model_dir / name).read_bytes())
    (checkpoint / "args.json").write_text(
        json.dumps({"model": str(tiny_model_dir), "system": None, "train_type": "full"})
    )
    code, _, err = export(capsys, "--adapters", checkpoint)
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(checkpoint.with_name("checkpoint-3-merged"))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits)


def test_not_a_checkpoint_is_one_line_and_writes_nothing(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("x")
    done = subprocess.run(
        [sys.executable, "-m", "selftune", "export", "--adapters", str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"selftune: error: --adapters {folder}: not a checkpoint (no adapter_config.json or "
        "config.json)"
    ]
    assert listing(tmp_path) == ["notes", "notes/todo.txt"]


def test_non_empty_output_is_refused_unless_forced(capsys, checkpoint, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    code, _, err = export(capsys, "--adapters", checkpoint, "--output_dir", output)
    assert code == 1
    assert error_lines(err) == [
        f"selftune: error: --output_dir {output}: not empty; pass --force true to replace it"
    ]
    assert listing(output) == ["keep.txt"]
    code, _, err = export(
        capsys, "--adapters", checkpoint, "--output_dir", output, "--force", "true"
    )
    assert code == 0, err
    assert "keep.txt" not in listing(output) and "model.safetensors" in listing(output)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_output_that_would_swallow_the_checkpoint_is_refused(capsys, checkpoint):
    code, _, err = export(
        capsys, "--adapters", checkpoint, "--output_dir", checkpoint.parent, "--force", "true"
    )
    assert code == 1 and "would overwrite the checkpoint" in err
    assert (checkpoint / "adapter_model.safetensors").is_file()


def tiny_config_folder(tmp_path, smol_tokenizer, config, name):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    folder = tmp_path / name
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["gpt2", "mistral"])
def test_unsupported_architecture_for_gguf_is_one_line(capsys, tmp_path, smol_tokenizer, kind):
    from transformers import GPT2Config, MistralConfig

    vocab = len(smol_tokenizer)
    config = (
        GPT2Config(vocab_size=vocab, n_embd=32, n_layer=1, n_head=2, n_positions=128)
        if kind == "gpt2"
        else MistralConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    base = tiny_config_folder(tmp_path, smol_tokenizer, config, f"tiny-{kind}")
    checkpoint = make_adapter_checkpoint(base, tmp_path / "run" / "checkpoint-2")
    before = listing(tmp_path)
    code, _, err = export(capsys, "--adapters", checkpoint, "--to_gguf", "true")
    assert code == 1
    assert error_lines(err) == [
        f"selftune: error: GGUF export supports Llama and Qwen2 models; this one is '{kind}' "
        "(export it with --merge_lora true and convert it with llama.cpp)"
    ]
    assert listing(tmp_path) == before


def test_bad_gguf_type_is_a_usage_error(capsys, checkpoint):
    code, _, err = export(
        capsys, "--adapters", checkpoint, "--to_gguf", "true", "--gguf_type", "q5_k"
    )
    assert code == 2 and "--gguf_type q5_k: use one of f16, q8_0, q4_0" in err
    assert not checkpoint.with_name("checkpoint-8-gguf").exists()


def test_a_failure_mid_export_leaves_no_folder(capsys, checkpoint, monkeypatch):
    import selftune.export.gguf

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(selftune.export.gguf, "write_gguf", disk_full)
    code, _, err = export(capsys, "--adapters", checkpoint, "--to_gguf", "true")
    assert code == 1 and "No space left on device" in err
    assert [p.name for p in checkpoint.parent.iterdir()] == ["checkpoint-8"]


def test_stale_temp_folder_of_a_killed_export_is_cleared(capsys, checkpoint):
    stale = checkpoint.with_name(".checkpoint-8-merged.tmp-999999999")
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    code, _, err = export(capsys, "--adapters", checkpoint)
    assert code == 0, err
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == [
        "checkpoint-8",
        "checkpoint-8-merged",
    ]


def test_exported_files_have_the_modes_of_a_plain_write(capsys, checkpoint, tmp_path):
    """Every file of an export gets 0666 less the umask, as the model card does: the weights too,
    which the library writes through a private (0600) temporary file."""
    import os
    import stat

    old = os.umask(0o027)
    try:
        code, _, err = export(
            capsys, "--adapters", checkpoint, "--merge_lora", "true", "--to_gguf", "true",
            "--output_dir", tmp_path / "out",
        )  # fmt: skip
    finally:
        os.umask(old)
    assert code == 0, err
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").rglob("*")}
    assert "model.safetensors" in modes and "model-f16.gguf" in modes
    assert set(modes.values()) == {0o640}
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750


def test_export_never_replaces_the_base_model_or_the_run(capsys, checkpoint, tiny_model_dir):
    """--force or not, the output is never the base model's folder (nor inside it), nor the
    run folder that holds the checkpoint, nor a folder inside the checkpoint."""
    before = sorted(p.name for p in tiny_model_dir.iterdir())
    targets = {
        tiny_model_dir: "would overwrite the base model's folder",
        tiny_model_dir / "merged": "would write inside the base model's folder",
        checkpoint.parent: "would overwrite the checkpoint",
        checkpoint / "merged": "would write inside the checkpoint it exports",
    }
    for output, message in targets.items():
        code, _, err = export(
            capsys, "--adapters", checkpoint, "--model", tiny_model_dir, "--output_dir", output,
            "--force", "true",
        )  # fmt: skip
        assert code == 1 and message in err, (output, err)
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == before
    assert not (checkpoint / "merged").exists()
