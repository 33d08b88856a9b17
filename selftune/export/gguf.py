"""Write a merged Hugging Face folder as one GGUF file for llama.cpp and Ollama.

Built on the `gguf` package (llama.cpp's own writer, tensor-name maps and quantisers). Supports
the architectures selftune trains (Llama, Qwen2) with byte-level BPE tokenizers (SmolLM2, Qwen2,
Llama 3). Tensors are converted one at a time, so memory stays at about one tensor.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from selftune.errors import SelftuneError

log = logging.getLogger(__name__)

GGUF_TYPES = ("f16", "q8_0", "q4_0")
ARCHITECTURES = {"llama": "LLAMA", "qwen2": "QWEN2"}  # HF model_type -> gguf.MODEL_ARCH name

# Split regexes of known tokenizer.json files -> llama.cpp's pre-tokenizer names.
SPLIT_PRE_TOKENIZERS = {
    # Qwen2 / Qwen2.5: single digits
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    # Llama 3: digits in groups of up to three
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
}


def read_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings from either spelling (transformers 5 `rope_parameters`, older
    `rope_theta` + `rope_scaling`)."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's name for the tokenizer's pre-tokenizer, or None when it has no equivalent."""
    if (tokenizer_json.get("model") or {}).get("type") != "BPE":
        return None
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm" if steps[1].get("use_regex", True) else None
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return SPLIT_PRE_TOKENIZERS.get((steps[0].get("pattern") or {}).get("Regex", ""))
    return None


def check_gguf_support(config: dict[str, Any], tokenizer_folder: Path) -> str:
    """Refuse, before any weight is read, what we cannot write; returns the pre-tokenizer name."""
    model_type = config.get("model_type", "?")
    if model_type not in ARCHITECTURES:
        raise SelftuneError(
            f"GGUF export supports Llama and Qwen2 models; this one is '{model_type}'"
            " (export it with --merge_lora true and convert it with llama.cpp)"
        )
    rope_type = rope_parameters(config)["rope_type"]
    if rope_type not in ("default", "linear", "llama3"):
        raise SelftuneError(f"GGUF export: RoPE scaling '{rope_type}' is not supported")
    tokenizer_file = tokenizer_folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise SelftuneError(f"GGUF export needs a tokenizer.json (none in {tokenizer_folder})")
    pre = pre_tokenizer_name(json.loads(tokenizer_file.read_text(encoding="utf-8")))
    if pre is None:
        raise SelftuneError(
            "GGUF export supports byte-level BPE tokenizers (SmolLM2, Qwen2, Llama 3); "
            f"the tokenizer in {tokenizer_folder} is another kind"
        )
    return pre


@dataclass
class TensorPlan:
    gguf_name: str
    hf_name: str  # empty for tensors we compute (rope_freqs)
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise SelftuneError(f"{folder}: no safetensors weights to convert")
    return files


def tensor_type(gguf_name: str, shape: tuple[int, ...], gguf_type: str) -> Any:
    """F32 for norms and biases; the asked type for matrices, where the row fits its blocks.

    q4_0 keeps the embeddings and output head at q8_0, as llama.cpp's quantiser keeps them high.
    """
    import gguf

    q = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return q.F32
    wanted = {"f16": q.F16, "q8_0": q.Q8_0, "q4_0": q.Q4_0}[gguf_type]
    if wanted == q.Q4_0 and gguf_name in ("token_embd.weight", "output.weight"):
        wanted = q.Q8_0
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else q.F16


def plan_tensors(folder: Path, config: dict[str, Any], gguf_type: str) -> list[TensorPlan]:
    import gguf
    from safetensors import safe_open

    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[config["model_type"]])
    name_map = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    plans: list[TensorPlan] = []
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as weights:
            for hf_name in weights.keys():
                if hf_name.endswith("rotary_emb.inv_freq"):
                    continue
                if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
                    continue  # llama.cpp reuses token_embd when output.weight is absent
                gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise SelftuneError(f"GGUF export: no llama.cpp name for tensor {hf_name}")
                shape = tuple(weights.get_slice(hf_name).get_shape())
                plans.append(
                    TensorPlan(gguf_name, hf_name, shape, tensor_type(gguf_name, shape, gguf_type))
                )
    if rope_parameters(config)["rope_type"] == "llama3":
        rope_name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        shape = (head_dim(config) // 2,)
        plans.append(TensorPlan(rope_name, "", shape, gguf.GGMLQuantizationType.F32))
    return plans


def head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def rotary_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's rows from HF's half-split rotary layout to llama.cpp's interleaved
    pairs: rows [x0..x(d/2-1), y0..y(d/2-1)] become [x0, y0, x1, y1, ...]."""
    rows = weight.shape[0]
    split = weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)


def llama3_rope_factors(config: dict[str, Any]) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's long-context RoPE, as llama.cpp reads them."""
    rope = rope_parameters(config)
    dim = head_dim(config)
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelength = 2 * math.pi / freq
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def tensor_data(plan: TensorPlan, weights: Any, config: dict[str, Any]) -> np.ndarray:
    """One tensor, as the bytes llama.cpp reads (permuted for Llama, converted, quantised)."""
    import gguf

    if not plan.hf_name:
        return llama3_rope_factors(config)
    data = weights.get_tensor(plan.hf_name).float().numpy()
    if config["model_type"] == "llama":
        if plan.hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = rotary_permute(data, config["num_attention_heads"])
        elif plan.hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            n_kv = config.get("num_key_value_heads") or config["num_attention_heads"]
            data = rotary_permute(data, n_kv)
    q = gguf.GGMLQuantizationType
    if plan.qtype == q.F32:
        return data.astype(np.float32)
    if plan.qtype == q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data.astype(np.float32), plan.qtype)


def iter_tensor_data(
    folder: Path, plans: list[TensorPlan], config: dict[str, Any]
) -> Iterator[np.ndarray]:
    from contextlib import ExitStack

    from safetensors import safe_open

    with ExitStack() as stack:
        owner = {}
        for path in weight_files(folder):
            handle = stack.enter_context(safe_open(str(path), framework="pt"))
            owner.update(dict.fromkeys(handle.keys(), handle))
        for plan in plans:
            yield tensor_data(plan, owner.get(plan.hf_name), config)


def stored_layout(plan: TensorPlan) -> tuple[tuple[int, ...], Any, int]:
    """(shape as stored, numpy dtype, byte count) of a planned tensor."""
    import gguf

    q = gguf.GGMLQuantizationType
    if plan.qtype == q.F32:
        return plan.shape, np.dtype(np.float32), 4 * math.prod(plan.shape)
    if plan.qtype == q.F16:
        return plan.shape, np.dtype(np.float16), 2 * math.prod(plan.shape)
    byte_shape = gguf.quant_shape_to_byte_shape(plan.shape, plan.qtype)
    return byte_shape, np.dtype(np.uint8), math.prod(byte_shape)


def vocabulary(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token texts and llama.cpp token types for every id of the embedding matrix."""
    import gguf

    by_id = {token_id: text for text, token_id in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for token_id in range(vocab_size):
        if token_id not in by_id:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        elif token_id in added:
            tokens.append(by_id[token_id])
            special = added[token_id].special
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[token_id])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def merges(tokenizer_json: dict[str, Any]) -> list[str]:
    """BPE merges as "left right" strings (newer tokenizer.json files store pairs)."""
    raw = tokenizer_json["model"].get("merges") or []
    if raw and isinstance(raw[0], list):
        # A space inside a pair part is written as U+0120, as llama.cpp expects.
        return [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in raw]
    return list(raw)


def add_tokenizer(writer: Any, folder: Path, config: dict[str, Any], pre: str) -> None:
    from selftune.models.load import load_tokenizer

    tokenizer = load_tokenizer(folder)
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tokens, types = vocabulary(tokenizer, config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges(tokenizer_json))
    special = {
        "bos": tokenizer.bos_token_id if tokenizer.bos_token else config.get("bos_token_id"),
        "eos": tokenizer.eos_token_id if tokenizer.eos_token else config.get("eos_token_id"),
        "unk": tokenizer.unk_token_id if tokenizer.unk_token else None,
        "pad": tokenizer.pad_token_id if tokenizer.pad_token else None,
    }
    for kind, token_id in special.items():
        if isinstance(token_id, list):
            token_id = token_id[0] if token_id else None
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(int(token_id))
    # Whether plain encoding adds BOS/EOS is read off the tokenizer's behaviour, not its config.
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(ids) and ids[0] == special["bos"])
    writer.add_add_eos_token(bool(ids) and ids[-1] == special["eos"] and len(ids) > 1)
    if isinstance(tokenizer.chat_template, str) and tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def add_hyperparameters(writer: Any, config: dict[str, Any], gguf_type: str) -> None:
    import gguf

    rope = rope_parameters(config)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config["hidden_size"] // config["num_attention_heads"]:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_vocab_size(config["vocab_size"])
    file_types = {
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }
    writer.add_file_type(file_types[gguf_type])
    if gguf_type != "f16":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_gguf(
    folder: Path, out_file: Path, gguf_type: str = "f16", name: str | None = None
) -> Path:
    """Convert the HF model folder `folder` (weights, config, tokenizer) into `out_file`."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise SelftuneError(f"--gguf_type {gguf_type}: use one of {', '.join(GGUF_TYPES)}")
    config = read_config(folder)
    pre = check_gguf_support(config, folder)
    plans = plan_tensors(folder, config, gguf_type)
    arch = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, ARCHITECTURES[config["model_type"]])]
    writer = gguf.GGUFWriter(None, arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or folder.name)
    add_hyperparameters(writer, config, gguf_type)
    add_tokenizer(writer, folder, config, pre)
    for plan in plans:
        shape, dtype, size = stored_layout(plan)
        raw = (
            None
            if plan.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
            else plan.qtype
        )
        writer.add_tensor_info(plan.gguf_name, shape, dtype, size, raw_dtype=raw)
    log.info("writing %s (%s, %d tensors)", out_file, gguf_type, len(plans))
    writer.write_header_to_file(out_file)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        for data in iter_tensor_data(folder, plans, config):
            writer.write_tensor_data(data)
    finally:
        writer.close()
    return out_file
