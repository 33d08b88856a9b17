"""Load model, tokenizer and adapters from a resolved folder, on the chosen device and dtype."""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selftune.args import EvalArgs, InferArgs
from selftune.errors import SelftuneError
from selftune.models import preload
from selftune.models.readahead import start_readahead
from selftune.models.resolve import resolve_model

log = logging.getLogger(__name__)


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

    check_quant_bits(quant_bits)
    folder = resolve_model(spec)
    started = time.perf_counter()
    device = pick_device(device)
    dtype = pick_dtype(torch_dtype, device)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(folder)
    extra: dict[str, Any] = {"device_map": {"": device}} if device != "cpu" or quant_bits else {}
    if quant_bits:
        extra["quantization_config"] = nf4_config(dtype)
    imports = (
        preload.import_in_thread(meanwhile)
        if meanwhile and preload.import_model_code(folder)
        else None
    )
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


def check_finite_weights(checkpoint: Path) -> None:
    """Refuse, in one line, a checkpoint whose saved weights hold a NaN or an infinity: they
    would answer with empty text or garbage as if all were well."""
    from safetensors import safe_open

    adapter = checkpoint / "adapter_model.safetensors"
    files = [adapter] if adapter.is_file() else sorted(checkpoint.glob("model*.safetensors"))
    for path in files:
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():
                tensor = weights.get_tensor(name)
                if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
                    raise SelftuneError(
                        f"{checkpoint}: its weights are not finite (NaN or inf in {name}): the "
                        "run that saved it diverged; use an earlier checkpoint"
                    )


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


def load_for_inference(args: InferArgs | EvalArgs, merge_lora: bool = False) -> Loaded:
    """Load --model, or the base model named by --adapters' checkpoint, with the adapters on
    (merged into the weights with `merge_lora`, or where several act together)."""
    adapters = [Path(a) for a in args.adapters]
    for adapter in adapters:
        if (
            not (adapter / "adapter_config.json").is_file()
            and not (adapter / "config.json").is_file()
        ):
            raise SelftuneError(f"--adapters {adapter}: not a checkpoint (no adapter_config.json)")
        check_finite_weights(adapter)
    saved = checkpoint_args(adapters[0]) if adapters else {}
    spec = args.model or saved.get("model")
    if not spec:
        raise SelftuneError(
            "no model given: pass --model, or --adapters with a selftune checkpoint"
        )
    full_checkpoint = adapters and (adapters[0] / "config.json").is_file()
    weights = str(adapters[0]) if full_checkpoint else spec
    start_readahead(weights)  # read while transformers imports and the tokenizer loads
    model, tokenizer, folder = load_model(
        weights,
        args.torch_dtype,
        args.device,
        args.quant_bits,
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
        if merge_lora or len(names) > 1:
            model = model.merge_and_unload()
        model.eval()
    system = args.system if args.system is not None else saved.get("system")
    return Loaded(model, tokenizer, folder, system, names)


def causal_lm(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model
