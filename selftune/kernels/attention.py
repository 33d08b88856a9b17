"""Packed-sequence attention on CUDA: PyTorch's own varlen flash attention.

A packed micro-batch is one row of several conversations; `cu_seq_lens` marks where each one
starts. transformers passes extra forward kwargs down to the attention function, so the
function registered here reads them and calls `torch.nn.attention.varlen.varlen_attn`, which
attends within each conversation only and spends no compute on padding or across boundaries.
Where that kernel is missing, packed rows fall back to transformers' own handling of packed
`position_ids` (a block-diagonal mask through SDPA), which is exact but slower.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)
NAME = "selftune_varlen"


GQA_NATIVE = False


def varlen_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    import inspect

    global GQA_NATIVE
    GQA_NATIVE = "enable_gqa" in inspect.signature(varlen_attn).parameters
    return True


def varlen_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query/key/value: (1, heads, tokens, dim); returns (1, tokens, heads, dim)."""
    from torch.nn.attention.varlen import varlen_attn

    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None or len(cu_seqlens) == 2:
        # an unpacked batch, or a pack of one sequence: plain causal SDPA, which measured
        # faster than the varlen kernel on an H100 (bench/README.md)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    max_len = int(kwargs["max_length_q"])
    groups = query.shape[1] // key.shape[1]
    q = query[0].transpose(0, 1)  # tokens, heads, dim
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    extra = {}
    if groups > 1 and GQA_NATIVE:
        extra["enable_gqa"] = True
    elif groups > 1:  # older kernels: repeat key/value heads for grouped-query attention
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    # window (-1, 0): every token sees all earlier tokens of its sequence and none after it
    # (the kernel's default, (-1, -1), is bidirectional).
    out = varlen_attn(
        q,
        k,
        v,
        cu_seqlens,
        cu_seqlens,
        max_len,
        max_len,
        scale=scaling,
        window_size=(-1, 0),
        **extra,
    )
    return out.unsqueeze(0), None


def no_mask(*args: Any, **kwargs: Any) -> None:
    """The varlen kernel is causal within each sequence by itself: no mask to build."""
    return None


def use_varlen_attention(model: Any) -> bool:
    """Switch a model to varlen attention for packed batches; False when not available."""
    if not varlen_available():
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, no_mask)
    model.set_attn_implementation(NAME)
    return True
