"""The GPU fast path for training, switched on where it can run and said once in the log.

- packed rows attend within their own conversation only (kernels.attention, varlen flash);
- logits only at label positions, chunked, never all held (kernels.linear_ce, in train.loss);
- Liger's fused RMSNorm / RoPE / SwiGLU kernels where `liger-kernel` is installed;
- LoRA projections that share an input (q/k/v, gate/up) run as one group in bf16
  (lora_routing, kernels.lora): one dropout, one GEMM for their A matrices, float32 master
  adapters; a SwiGLU MLP's gate, up and activation as one node, the rank-r products added
  inside the activation (kernels.lora_mlp).
"""

from __future__ import annotations

import logging
from typing import Any

from selftune.accel.liger import LIGER_PATCHES, apply_liger

log = logging.getLogger(__name__)


def packs_safely(model: Any) -> bool:
    """Whether packed rows train on this model exactly as separate rows: the families whose
    attention our varlen kernel reproduces (full causal attention, no logit soft-capping, no
    sliding window). Others keep padded rows unless --packing asks otherwise."""
    config = model.config
    if config.model_type not in LIGER_PATCHES:
        return False
    if getattr(config, "attn_logit_softcapping", None):
        return False
    windowed = getattr(config, "sliding_window", None) and getattr(
        config, "use_sliding_window", True
    )
    layer_types = getattr(config, "layer_types", None) or []
    return not windowed and all(t == "full_attention" for t in layer_types)


def enable_fast_path(
    model: Any,
    device: str,
    packing: bool,
    liger: bool = True,
    varlen: bool = True,
    grouped_lora: bool = True,
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
    if grouped_lora:  # after Liger: its SwiGLU forward is the one a LoRA MLP falls back on
        enabled += use_grouped_lora(model)
    if packing and varlen:
        import torch

        from selftune.accel.kernels.attention import use_varlen_attention

        dtype = next(model.parameters()).dtype
        if dtype not in (torch.float16, torch.bfloat16):  # the flash kernels take 16-bit only
            log.info("fast path: %s weights; packed rows use a masked SDPA", dtype)
        elif use_varlen_attention(model):
            enabled.append("varlen attention for packed rows")
        else:
            log.info("fast path: no varlen attention kernel here; packed rows use a masked SDPA")
    enabled.append("label-only chunked cross-entropy")
    return enabled


def use_grouped_lora(model: Any) -> list[str]:
    """Route plain LoRA layers through the grouped kernels (lora_routing.fuse_lora), except
    under several processes (FSDP2
    swaps parameters under the modules; PEFT's own forward is the one checked there)."""
    import torch.distributed as dist

    from selftune.accel.lora_routing import fuse_lora

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        log.info("fast path: grouped LoRA is off under several processes")
        return []
    routed = fuse_lora(model)
    return [f"grouped bf16 LoRA ({routed} layers)"] if routed else []


def disable_fast_path(model: Any) -> None:
    """Give the model back its library forwards where they were replaced for training."""
    from selftune.accel.lora_routing import unfuse_lora

    unfuse_lora(model)
