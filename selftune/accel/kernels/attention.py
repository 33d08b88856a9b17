"""Packed-sequence attention on CUDA: PyTorch's own varlen flash attention, or cuDNN's.

A packed micro-batch is one row of several conversations; `cu_seq_lens` marks where each one
starts. transformers passes extra forward kwargs down to the attention function, so the
function registered here reads them and calls `torch.nn.attention.varlen.varlen_attn`, which
attends within each conversation only and spends no compute on padding or across boundaries.
A pack whose conversations all have the same length (rows of a fixed length, as in
2048-token training) is a plain batch instead: causal SDPA over (conversations, heads, length,
dim), with cuDNN's kernel first: it runs the forward and backward of such rows faster than
varlen flash does, grouped-query heads read as they are (bench/README.md). Where the varlen
kernel is missing, packed rows fall back to transformers' own handling of packed
`position_ids` (a block-diagonal mask through SDPA), which is exact but slower.

The views taken here keep autograd from copying: `squeeze(0)` rather than `[0]`, whose
backward writes the gradient into a new zeroed tensor in heads-first order, which the RoPE
kernel and the projections would then copy back.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

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


# cuDNN first where it takes the shapes; the others as SDPA orders them otherwise
DENSE_BACKENDS = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def equal_segments(tokens: int, cu_seqlens: torch.Tensor, max_len: int) -> int:
    """How many conversations of `max_len` tokens each make up the pack, or 0 when their
    lengths differ. Read off shapes and the host-side longest length alone: no conversation is
    longer than max_len, so n of them fill n * max_len tokens only when all are that long."""
    segments = cu_seqlens.shape[0] - 1
    return segments if segments * max_len == tokens else 0


def dense_causal(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows: int, scale: float | None
) -> torch.Tensor:
    """(tokens, heads, dim) of `rows` equal conversations -> causal SDPA of each, same layout."""
    tokens, heads, dim = query.shape

    def batch(t: torch.Tensor) -> torch.Tensor:
        return t.view(rows, tokens // rows, t.shape[1], dim).transpose(1, 2)

    gqa = heads != key.shape[1]
    with sdpa_kernel(DENSE_BACKENDS, set_priority=True):
        out = F.scaled_dot_product_attention(
            batch(query), batch(key), batch(value), is_causal=True, scale=scale, enable_gqa=gqa
        )
    return out.transpose(1, 2).reshape(tokens, heads, dim)


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
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:  # an unpacked batch, with its own mask
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    max_len = int(kwargs["max_length_q"])
    q = query.squeeze(0).transpose(0, 1)  # tokens, heads, dim: the layout the kernels take
    k = key.squeeze(0).transpose(0, 1)
    v = value.squeeze(0).transpose(0, 1)
    rows = equal_segments(q.shape[0], cu_seqlens, max_len)
    if rows:
        return dense_causal(q, k, v, rows, scaling).unsqueeze(0), None
    from torch.nn.attention.varlen import varlen_attn

    groups = q.shape[1] // k.shape[1]
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
