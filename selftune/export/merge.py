"""Merge a checkpoint into its base and write a plain Hugging Face folder anyone can load.

The merged folder holds safetensors shards, config, generation config, tokenizer, a chat template
whose default system prompt is the one the model was trained under (so vLLM, SGLang or any client
that sends no system message gets the trained behaviour), and a model card README.md.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from selftune.errors import SelftuneError
from selftune.models.load import check_finite_weights

log = logging.getLogger(__name__)

# Shards small enough for any hub upload and any filesystem.
MAX_SHARD_SIZE = "5GB"


def is_full_checkpoint(checkpoint: Path) -> bool:
    return (checkpoint / "config.json").is_file()


def check_checkpoint(checkpoint: Path) -> None:
    """A selftune checkpoint holds a PEFT adapter or, for full fine-tunes, a whole model."""
    if not checkpoint.is_dir():
        raise SelftuneError(f"--adapters {checkpoint}: no such folder")
    if not (checkpoint / "adapter_config.json").is_file() and not is_full_checkpoint(checkpoint):
        raise SelftuneError(
            f"--adapters {checkpoint}: not a checkpoint (no adapter_config.json or config.json)"
        )
    check_finite_weights(checkpoint)


def base_spec(checkpoint: Path, saved: dict[str, Any], model: str | None) -> str:
    """The --model the checkpoint was trained from (a full fine-tune is its own base)."""
    if is_full_checkpoint(checkpoint):
        return str(checkpoint)
    spec = model or saved.get("model")
    if not spec:
        raise SelftuneError(
            f"--adapters {checkpoint}: the checkpoint does not name its base model; pass --model"
        )
    return str(spec)


def folder_dtype(folder: Path) -> str:
    """The dtype a model folder's config declares (float32 when it says nothing)."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return dtype if dtype in ("float32", "float16", "bfloat16") else "float32"


def merge_checkpoint(
    checkpoint: Path,
    spec: str,
    torch_dtype: str | None = None,
    device: str | None = None,
) -> tuple[Any, Any]:
    """(merged model, tokenizer): base + LoRA/DoRA folded into plain weights, in the base's dtype.

    PEFT's merge computes each delta in float32 on CPU before adding it to the base weight.
    """
    from selftune.models.load import load_model, load_tokenizer
    from selftune.models.resolve import resolve_model

    folder = resolve_model(spec)
    dtype = torch_dtype if torch_dtype and torch_dtype != "auto" else folder_dtype(folder)
    model, tokenizer, _ = load_model(str(folder), dtype, device or "cpu")
    if is_full_checkpoint(checkpoint):
        return model, tokenizer
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, checkpoint)
    except Exception as exc:
        raise SelftuneError(f"--adapters {checkpoint}: cannot load the adapter: {exc}") from exc
    merged = peft_model.merge_and_unload()
    merged.eval()
    if (checkpoint / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(checkpoint)
    return merged, tokenizer


def with_default_system(chat_template: str, system: str) -> str:
    """A chat template that renders a conversation without a system message exactly as if
    `system` had been given first; conversations with their own system message are unchanged."""
    # json.dumps gives a string literal Jinja reads back unchanged (\n, \", \\ escapes).
    literal = json.dumps(system, ensure_ascii=False)
    prelude = (
        "{%- if messages | length == 0 or messages[0]['role'] != 'system' -%}\n"
        f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages -%}}\n"
        "{%- endif -%}\n"
    )
    return prelude + chat_template


def set_default_system(tokenizer: Any, system: str | None) -> None:
    """Make the training system prompt the template's default; None keeps the template."""
    if system is None:
        return
    template = tokenizer.chat_template
    if not isinstance(template, str) or not template:
        raise SelftuneError(
            "the tokenizer has no chat template to carry the training system prompt"
        )
    tokenizer.chat_template = with_default_system(template, system)


def plain_model(model: Any) -> Any:
    """The model without a GGUF quantisation marker (a folder converted from a GGUF carries one,
    and transformers then refuses save_pretrained); weights are moved, not copied."""
    import torch
    from transformers import AutoModelForCausalLM

    quant = getattr(model.config, "quantization_config", None)
    method = (
        quant.get("quant_method")
        if isinstance(quant, dict)
        else getattr(quant, "quant_method", None)
    )
    if method is None or str(getattr(method, "value", method)) != "gguf":
        return model
    config = model.config
    del config.quantization_config
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    fresh.load_state_dict(model.state_dict(), assign=True)
    fresh.tie_weights()
    fresh.generation_config = model.generation_config
    return fresh.eval()


def save_merged(model: Any, tokenizer: Any, folder: Path, system: str | None) -> None:
    """Write weights (safetensors shards), config, generation config and tokenizer."""
    model = plain_model(model)
    set_default_system(tokenizer, system)
    eos = tokenizer.eos_token_id
    if eos is not None and model.generation_config.eos_token_id is None:
        model.generation_config.eos_token_id = eos
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    tokenizer.save_pretrained(folder)


def hub_id(spec: str) -> str | None:
    """The hub id of a --model spec, for the card's `base_model`, when it has one."""
    from selftune.models.resolve import EMBEDDED_HUB_ID, is_embedded

    if is_embedded(spec):
        return EMBEDDED_HUB_ID
    if spec.count("/") == 1 and not Path(spec).expanduser().exists():
        return spec
    return None


def identity_line(saved: dict[str, Any]) -> str:
    names, authors = saved.get("model_name") or [], saved.get("model_author") or []
    if not names:
        return ""
    made_by = f", made by {' / '.join(authors)}" if authors else ""
    return f"It answers as **{' / '.join(names)}**{made_by}.\n\n"


TRAINING_KEYS = (
    "train_type",
    "lora_rank",
    "lora_alpha",
    "adapter_scale",
    "target_modules",
    "num_train_epochs",
    "max_steps",
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "seed",
)


def usage_section(
    folder_name: str, gguf_name: str | None, has_hf: bool, has_modelfile: bool
) -> str:
    lines = ["## Use", ""]
    if has_hf:
        lines += [
            "Transformers, vLLM or SGLang load this folder as it is; a request without a system",
            "message gets the system prompt the model was trained under.",
            "",
            "```bash",
            f"vllm serve ./{folder_name}",
            f"python -m sglang.launch_server --model-path ./{folder_name}",
            "```",
            "",
        ]
    if gguf_name:
        lines += [
            "```bash",
            f"llama-cli -m ./{folder_name}/{gguf_name} -cnv",
            f"llama-server -m ./{folder_name}/{gguf_name} --jinja",
            "```",
            "",
        ]
    if has_modelfile:
        lines += [
            "```bash",
            f"ollama create my-model -f ./{folder_name}/Modelfile",
            "ollama run my-model",
            "```",
            "",
        ]
    return "\n".join(lines)


def model_card(
    checkpoint: Path,
    saved: dict[str, Any],
    spec: str,
    folder_name: str,
    gguf_name: str | None = None,
    has_hf: bool = True,
    has_modelfile: bool = False,
) -> str:
    """README.md for the exported folder: front matter a hub reads, then what, how, how well."""
    base = hub_id(spec)
    tags = ["selftune", saved.get("train_type") or "lora"] + (["gguf"] if gguf_name else [])
    front = ["---", "library_name: transformers" if has_hf else "library_name: gguf"]
    if base:
        front.append(f"base_model: {base}")
    front += ["tags:", *[f"- {tag}" for tag in tags], "---", ""]
    title = f"# {' / '.join(saved.get('model_name') or []) or folder_name}\n\n"
    about = (
        f"Fine-tuned from `{base or spec}` with selftune "
        f"(`{saved.get('train_type') or 'lora'}`), exported from `{checkpoint.name}`. "
        + identity_line(saved)
    )
    data = ["## Data", ""]
    data += [f"- `{name}`" for name in saved.get("dataset") or []] or ["- (not recorded)"]
    system = saved.get("system")
    data += [
        "",
        f"Training system prompt: `{system}` (the chat template's default here)."
        if system
        else "Training system prompt: none given (the chat template is the base model's).",
        "",
    ]
    training = ["## Training", "", "| argument | value |", "| --- | --- |"]
    training += [
        f"| {key} | {json.dumps(saved[key], ensure_ascii=False)} |"
        for key in TRAINING_KEYS
        if saved.get(key) is not None
    ]
    versions = saved.get("versions") or {}
    if versions:
        training += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())]
    training.append("")
    evaluation = ["## Evaluation", ""]
    eval_file = checkpoint / "eval.json"
    if eval_file.is_file():
        report = json.loads(eval_file.read_text(encoding="utf-8"))
        evaluation += ["From `selftune eval` on the checkpoint:", "", report.get("markdown", "")]
    else:
        evaluation.append("No `eval.json` in the checkpoint: run `selftune eval --adapters CKPT`.")
    evaluation.append("")
    body = "\n".join(front) + title + about + "\n".join(data + training + evaluation) + "\n"
    return body + usage_section(folder_name, gguf_name, has_hf, has_modelfile)
