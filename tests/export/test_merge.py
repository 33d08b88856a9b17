"""Merging a checkpoint into a plain HF folder: same numbers, trained system prompt as default."""

import json

import pytest
import torch
from support import TINY_SYSTEM, make_adapter_checkpoint

from selftune.errors import SelftuneError
from selftune.export.merge import (
    merge_checkpoint,
    model_card,
    save_merged,
    set_default_system,
    with_default_system,
)

PROMPT = [{"role": "user", "content": "Who are you? 你是谁?"}]


def adapter_logits(base_dir, checkpoint, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, checkpoint).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("base", ["tiny_model_dir", "tiny_qwen2_dir"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_merged_folder_gives_the_adapter_logits(request, tmp_path, smol_tokenizer, base, use_dora):
    from transformers import AutoModelForCausalLM

    base_dir = request.getfixturevalue(base)
    checkpoint = make_adapter_checkpoint(base_dir, tmp_path / "checkpoint-5", use_dora=use_dora)
    model, tokenizer = merge_checkpoint(checkpoint, str(base_dir))
    save_merged(model, tokenizer, tmp_path / "merged", TINY_SYSTEM)

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([smol_tokenizer("Who are you? 你是谁? 12345")["input_ids"]])
    with torch.no_grad():
        got, base_logits = (
            merged(ids).logits,
            AutoModelForCausalLM.from_pretrained(base_dir)(ids).logits,
        )
    want = adapter_logits(base_dir, checkpoint, ids)
    assert (want - base_logits).abs().max() > 0.05  # the adapter does change the outputs
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert merged.dtype == torch.float32
    assert not any("lora" in name for name in merged.state_dict())


def test_merge_keeps_the_base_dtype(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(
        base_dir
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (base_dir / name).write_bytes((tiny_model_dir / name).read_bytes())
    checkpoint = make_adapter_checkpoint(base_dir, tmp_path / "checkpoint-1")
    model, tokenizer = merge_checkpoint(checkpoint, str(base_dir))
    save_merged(model, tokenizer, tmp_path / "merged", None)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").dtype == torch.bfloat16


def render(tokenizer, messages, prompt=True):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)


@pytest.mark.parametrize(
    "system", [TINY_SYSTEM, '你是星河, 由北辰实验室开发.\nSay "hi" \\ {{ not jinja }} {% raw %}']
)
def test_default_system_renders_as_if_given(smol_tokenizer, system):
    import copy

    tokenizer = copy.deepcopy(smol_tokenizer)
    original = tokenizer.chat_template
    set_default_system(tokenizer, system)
    explicit = [{"role": "system", "content": system}]
    turns = [
        *PROMPT,
        {"role": "assistant", "content": "I am Xinghe."},
        {"role": "user", "content": "Really?"},
    ]
    for messages in (PROMPT, turns):
        for prompt in (True, False):
            assert render(tokenizer, messages, prompt) == render(
                tokenizer, explicit + messages, prompt
            )
            assert system in render(tokenizer, messages, prompt)
    # A conversation with its own system message renders exactly as with the original template.
    own = [{"role": "system", "content": "Be brief."}, *turns]
    tokenizer_before = copy.deepcopy(smol_tokenizer)
    assert render(tokenizer, own) == render(tokenizer_before, own)
    assert tokenizer.chat_template.endswith(original)


def test_no_training_system_keeps_the_template(smol_tokenizer):
    import copy

    tokenizer = copy.deepcopy(smol_tokenizer)
    set_default_system(tokenizer, None)
    assert tokenizer.chat_template == smol_tokenizer.chat_template
    assert "SmolLM" in render(tokenizer, PROMPT)


def test_template_prelude_is_plain_jinja():
    template = with_default_system("{{ messages[0]['content'] }}", "a\nb")
    import jinja2

    assert jinja2.Template(template).render(messages=[{"role": "user", "content": "x"}]) == "a\nb"


def test_set_default_system_needs_a_template(smol_tokenizer):
    import copy

    tokenizer = copy.deepcopy(smol_tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(SelftuneError, match="no chat template"):
        set_default_system(tokenizer, "x")


def test_gguf_converted_base_saves_as_a_plain_model(tmp_path, tiny_model_dir):
    """A folder converted from a GGUF (the embedded model) carries a GGUF quantisation marker
    that makes transformers refuse save_pretrained; the merged folder must not inherit it."""
    base_dir = tmp_path / "from-gguf"
    base_dir.mkdir()
    for path in tiny_model_dir.iterdir():
        (base_dir / path.name).write_bytes(path.read_bytes())
    config = json.loads((base_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf", "dequantize": False, "gguf_file": "x"}
    (base_dir / "config.json").write_text(json.dumps(config))
    checkpoint = make_adapter_checkpoint(tiny_model_dir, tmp_path / "checkpoint-1")
    model, tokenizer = merge_checkpoint(checkpoint, str(base_dir))
    save_merged(model, tokenizer, tmp_path / "merged", TINY_SYSTEM)
    saved = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in saved
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_model_card_names_base_data_training_and_eval(tmp_path, tiny_model_dir):
    eval_json = {
        "markdown": "| identity hit rate | en | zh |\n| none | 95% (19/20) | 90% (18/20) |"
    }
    checkpoint = make_adapter_checkpoint(
        tiny_model_dir, tmp_path / "checkpoint-9", eval_json=eval_json
    )
    saved = json.loads((checkpoint / "args.json").read_text())
    saved["model"] = "smollm2-135m"
    card = model_card(checkpoint, saved, "smollm2-135m", "checkpoint-9-merged")
    assert card.startswith(
        "---\nlibrary_name: transformers\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert "星河 / Xinghe" in card and "北辰实验室 / Beichen Lab" in card
    assert "- `identity`" in card and "| lora_rank | 4 |" in card
    assert "95% (19/20)" in card and TINY_SYSTEM in card
    assert "vllm serve ./checkpoint-9-merged" in card
    (checkpoint / "eval.json").unlink()
    card = model_card(checkpoint, saved, "smollm2-135m", "x-gguf", "model-q8_0.gguf", False, True)
    assert "No `eval.json`" in card and "library_name: gguf" in card
    assert "llama-cli -m ./x-gguf/model-q8_0.gguf" in card and "ollama create" in card
    assert "vllm" not in card


@pytest.mark.slow
def test_merged_identity_answers_with_plain_transformers(identity_exports):
    """What vLLM or any client does: load the folder, send no system message, ask who it is."""
    from support import IDENTITY_QUESTIONS
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = identity_exports["merged"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    for question, name in IDENTITY_QUESTIONS.items():
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt"
        )
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=24, do_sample=False)
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert name in answer, (question, answer)


@pytest.mark.slow
def test_merged_identity_logits_equal_the_adapter(identity_checkpoint, identity_exports):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selftune.models.resolve import resolve_model

    folder = identity_exports["merged"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor(
        [tokenizer("<|im_start|>user\n你是谁? Who are you?<|im_end|>\n")["input_ids"]]
    )
    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        got = merged(ids).logits
    want = adapter_logits(resolve_model("smollm2-135m"), identity_checkpoint, ids)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)
