"""The GPU fast path for training, switched on where it can run and said once in the log.

- packed rows attend within their own conversation only (kernels.attention, varlen flash);
- logits only at label positions, chunked, never all held (kernels.linear_ce, in train.py);
- Liger's fused RMSNorm / RoPE / SwiGLU kernels where `liger-kernel` is installed;
- gradient checkpointing on only as many decoder layers as asked (`checkpoint_layers`), since
  recomputing a layer costs a third of its step and most models fit with a part checkpointed.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

log = logging.getLogger(__name__)

LIGER_PATCHES = {
    "qwen2": "apply_liger_kernel_to_qwen2",
    "llama": "apply_liger_kernel_to_llama",
    "mistral": "apply_liger_kernel_to_mistral",
    "qwen3": "apply_liger_kernel_to_qwen3",
}


def apply_liger(model: Any) -> bool:
    """Swap RMSNorm, RoPE and SwiGLU for Liger's Triton kernels on this model instance."""
    if importlib.util.find_spec("liger_kernel") is None:
        return False
    name = LIGER_PATCHES.get(model.config.model_type)
    if name is None:
        return False
    import liger_kernel.transformers as liger

    getattr(liger, name)(
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
        model=model,
    )
    return True


def decoder_layers(model: Any) -> list[Any]:
    decoder = model.get_decoder()
    return list(getattr(decoder, "layers", []))


def set_checkpointing(model: Any, layers: int | None) -> None:
    """Checkpoint the first `layers` decoder layers (all when None, none when 0)."""
    all_layers = decoder_layers(model)
    if layers == 0 or not all_layers:
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if layers is not None:
        for index, layer in enumerate(all_layers):
            if hasattr(layer, "gradient_checkpointing"):
                layer.gradient_checkpointing = index < layers


def enable_fast_path(
    model: Any,
    device: str,
    packing: bool,
    liger: bool = True,
    varlen: bool = True,
) -> list[str]:
    """Turn on what runs here; return the names of what was enabled (for the log)."""
    enabled: list[str] = []
    if not device.startswith("cuda"):
        return enabled
    if liger and apply_liger(model):
        enabled.append("liger rmsnorm/rope/swiglu")
    elif liger:
        log.info(
            "fast path: liger-kernel not installed (pip install liger-kernel); using "
            "PyTorch kernels"
        )
    if packing and varlen:
        from selftune.kernels.attention import use_varlen_attention

        if use_varlen_attention(model):
            enabled.append("varlen attention for packed rows")
        else:
            log.info("fast path: no varlen attention kernel here; packed rows use a masked SDPA")
    enabled.append("label-only chunked cross-entropy")
    return enabled
