"""Liger's fused RMSNorm, RoPE and SwiGLU kernels patched into a model instance, where
liger-kernel is installed."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

from selftune.accel.lora_routing import reroute_mlps

LIGER_PATCHES = {
    "qwen2": "apply_liger_kernel_to_qwen2",
    "llama": "apply_liger_kernel_to_llama",
    "mistral": "apply_liger_kernel_to_mistral",
    "qwen3": "apply_liger_kernel_to_qwen3",
}


def apply_liger(model: Any) -> bool:
    """Swap RMSNorm, RoPE and SwiGLU for Liger's Triton kernels on this model instance.

    Liger also rebinds the modeling module's names: its classes, which only later models would
    build from, go back to the library's; its RoPE function, which every model of the family
    calls, runs Liger's kernel on CUDA tensors and the library's elsewhere (a CPU model in the
    same process would fail in Triton)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return False
    family = model.config.model_type
    name = LIGER_PATCHES.get(family)
    if name is None:
        return False
    import liger_kernel.transformers as liger

    # the module Liger patches, whatever the model's own class
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    before = dict(vars(module))
    try:
        getattr(liger, name)(
            rope=True,
            rms_norm=True,
            swiglu=True,
            cross_entropy=False,
            fused_linear_cross_entropy=False,
            model=model,
        )
    finally:  # also where Liger failed half way
        for key, library in before.items():
            patched = vars(module).get(key, library)
            if patched is library:
                continue
            if key == "apply_rotary_pos_emb":
                setattr(module, key, rope_on_cuda_only(patched, library))
            else:
                setattr(module, key, library)
    reroute_mlps(model)  # MLPs routed for training before (decode after training) keep it
    return True


def rope_on_cuda_only(
    kernel: Callable[..., Any], library: Callable[..., Any]
) -> Callable[..., Any]:
    """`apply_rotary_pos_emb` by `kernel` for CUDA tensors, by the library's function otherwise.
    The arguments pass through as given: the attention code calls it with (q, k, cos, sin),
    which both take alike (their fifth positional parameters differ)."""
    library = getattr(library, "library", library)  # applied twice: one level, not a chain

    def apply_rotary_pos_emb(q: Any, k: Any, *args: Any, **kwargs: Any) -> Any:
        use = kernel if q.is_cuda else library
        return use(q, k, *args, **kwargs)

    apply_rotary_pos_emb.library = library  # type: ignore[attr-defined]
    return apply_rotary_pos_emb
