"""The attention of a one-token decode step in two launches: RoPE, cache write and attention.

Why: a batch-1 decode step replays hundreds of small kernels and the GPU idles between each
two, so a step's time follows its kernel count (bench/README.md). Per layer, transformers'
attention runs RoPE, the static cache's update (an arange, two adds, two `index_copy_`) and
SDPA: seven kernels to attend one query over a few hundred cached positions. Here one kernel
rotates the new query and key, attends each key/value head's queries over one chunk of the
cache (the new token's key and value from registers) and writes the new key and value into
the cache; a second merges the chunks (split-K attention, as flash-decoding does). The cache's
length counter advances in the first kernel, so the cache is left as its own `update` leaves it.

Only the static decoder's steps take this path (`Slot` holds the cache and the position they
run at); a prompt, training and every other call run the module's own forward. Models: the
Llama, Qwen2 and Mistral attention (rotate-half RoPE, no sliding window, no norms on q and k),
head sizes of 32-256 that are powers of two, 16-bit weights, Triton installed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from selftune.accel.kernels import load_triton

log = logging.getLogger(__name__)
SUPPORTED = ("LlamaAttention", "Qwen2Attention", "MistralAttention")
BLOCK = 32  # cached positions per tile
MAX_SPLITS = 64  # chunks of the cache a key/value head's queries are split over
LOG2E = 1.4426950408889634


@dataclass
class Slot:
    """The cache and position the decode step being run (or captured) attends at; empty
    outside the static decoder's steps."""

    cache: Any = None
    position: torch.Tensor | None = None  # (1, 1) long, on the model's device
    failed: bool = False  # the kernels raised once: every layer keeps its own forward since


def runs_on(device: torch.device) -> bool:
    """Whether the kernels can run for tensors on `device`: compiled on a GPU, or on the CPU
    under Triton's interpreter (the tests)."""
    if load_triton() is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def supported(module: Any) -> bool:
    if type(module).__name__ not in SUPPORTED:
        return False
    if getattr(module, "sliding_window", None) is not None:
        return False
    if any(hasattr(module, name) for name in ("q_norm", "k_norm", "sinks")):
        return False
    config = getattr(module, "config", None)
    if getattr(config, "attn_logit_softcapping", None):
        return False
    head_dim = getattr(module, "head_dim", 0)
    needed = ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx", "scaling")
    return (
        all(hasattr(module, name) for name in needed)
        and head_dim in (32, 64, 128, 256)
        and getattr(module, "num_key_value_groups", 0) >= 1
    )


def layout(cache_len: int) -> tuple[int, int, int]:
    """(chunks, splits, chunk): the cache in `chunks` chunks of a whole number of tiles each,
    at most `splits`, a power of two (the width the merge reads)."""
    splits = min(MAX_SPLITS, 1 << (-(-cache_len // BLOCK) - 1).bit_length())
    chunk = -(-cache_len // splits)
    chunk = -(-chunk // BLOCK) * BLOCK
    return -(-cache_len // chunk), splits, chunk


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    layer: Any,
    position: torch.Tensor,
    scaling: float,
    head_dim: int,
) -> torch.Tensor | None:
    """(1, 1, heads * head_dim) attention output of the token at `position`, its q, k, v
    (1, 1, width) the projections before RoPE; its key and value land in the cache `layer`
    (a StaticCache layer). None when the shapes are not the ones the kernels take."""
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    length = getattr(layer, "cumulative_length", None)
    if keys is None or values is None or not isinstance(length, torch.Tensor):
        return None
    if getattr(layer, "is_sliding", False):  # a window's cache rolls: not the layout read here
        return None
    batch, kv_heads, cache_len, dim = keys.shape
    heads = q.shape[-1] // head_dim
    fits = (
        batch == 1
        and dim == head_dim
        and values.shape == keys.shape
        and keys.is_contiguous()
        and values.is_contiguous()
        and q.shape[:-1] == k.shape[:-1] == v.shape[:-1] == (1, 1)
        and k.shape[-1] == v.shape[-1] == kv_heads * dim
        and heads % kv_heads == 0
        and all(t.stride(-1) == 1 and t.dtype == keys.dtype for t in (q, k, v))
        and cos.numel() == sin.numel() == dim
        and keys.dtype in (torch.float16, torch.bfloat16)
        and length.numel() == 1
        # Triton launches on the current device: a layer placed on another GPU keeps SDPA
        and (q.device.type != "cuda" or q.device.index == torch.cuda.current_device())
    )
    if not fits:
        return None
    group = heads // kv_heads
    chunks, splits, chunk = layout(cache_len)
    part_m = torch.empty(heads, splits, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(heads, splits, dim, dtype=torch.float32, device=q.device)
    kernels = load_triton()
    kernels.decode_attention_split[(kv_heads, chunks)](
        q, k, v, cos.contiguous(), sin.contiguous(), keys, values, position, length,
        part_m, part_l, part_acc, scaling * LOG2E, cache_len, chunk,
        group=group, group_per=max(16, 1 << (group - 1).bit_length()), half=dim // 2,
        block=BLOCK, splits=splits, num_warps=4,
    )  # fmt: skip
    out = torch.empty(1, 1, heads * dim, dtype=q.dtype, device=q.device)
    kernels.decode_attention_combine[(heads,)](
        part_m, part_l, part_acc, out, position, chunk, dim=dim, splits=splits, num_warps=4
    )
    return out
