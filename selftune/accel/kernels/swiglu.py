"""SwiGLU over LoRA-adapted gate and up projections, the adapters' rank-r products added inside.

Grouped LoRA writes each B product and lets the base GEMM accumulate into it (beta = 1). For
wide gate and up outputs that accumulating GEMM is slower than a plain one, and writing the B
product costs a pass of its own (bench/kernel_times.py, bench/README.md), in the forward and
again in a checkpointed layer's recompute. Here the base GEMMs write gate's
and up's plain outputs, and one pass adds `low_i @ B_i.T` per tile (tl.dot of (rows, ranks) by
(ranks, columns): the rank-r products are read, never written) as it applies silu(gate) * up, in
float32. The backward computes the same sums again and writes gate's and up's gradients over
the saved plain outputs, in place, as Liger's SwiGLU does.
"""

from __future__ import annotations

import torch

from selftune.accel.kernels import load_triton

ROWS, COLUMNS, WARPS = 16, 128, 4  # a program's tile, chosen with bench/kernel_times.py
MAX_RANK = 128  # one member's rank that one tile holds; wider adapters keep the PyTorch version


def usable(gate: torch.Tensor, ranks: tuple[int, ...]) -> bool:
    """16-bit rows on a GPU, ranks that one tile holds, Triton installed."""
    return (
        gate.is_cuda
        and gate.dtype in (torch.float16, torch.bfloat16)
        and max(ranks) <= MAX_RANK
        and load_triton() is not None
    )


def forward(gate, up, low, b_scaled) -> torch.Tensor:
    """silu(g) * u in gate's dtype for g, u the sums below: gate and up (tokens, width) each,
    `low` the group's rank-r products (gate's ranks first), `b_scaled` gate's and up's B times
    their scales. Through the Triton kernel where it runs."""
    if usable(gate, ranks_of(b_scaled)):
        return kernel_forward(gate, up, low, b_scaled)
    g, u = sums(gate, up, low, b_scaled)
    return (torch.nn.functional.silu(g) * u).to(gate.dtype)


def backward_(grad, gate, up, low, b_scaled, deferred: tuple | None = None) -> None:
    """Overwrite `gate` and `up` (forward's plain outputs) with their gradients, for `grad` the
    gradient of forward's output, or of its base part alone with `deferred` = (low_grad, A):
    down_proj's adapter part, low_grad @ A (no dropout on it), is added here as grad is read."""
    grad = grad.contiguous()
    down_rank = 1 if deferred is None else deferred[1].shape[0]
    if usable(gate, (*ranks_of(b_scaled), down_rank)):
        kernel_backward_(grad, gate, up, low, b_scaled, deferred)
        return
    if deferred is not None:
        grad = torch.addmm(grad, *deferred)
    g, u = sums(gate, up, low, b_scaled)
    sig = torch.sigmoid(g)
    silu = g * sig
    grad = grad.float()
    gate.copy_(grad * u * (sig + silu * (1 - sig)))
    up.copy_(grad * silu)


def sums(gate, up, low, b_scaled) -> tuple[torch.Tensor, torch.Tensor]:
    """gate + low_gate @ B_gate.T and up + low_up @ B_up.T, in float32."""
    rank = b_scaled[0].shape[1]
    g = torch.addmm(gate.float(), low[:, :rank].float(), b_scaled[0].float().t())
    u = torch.addmm(up.float(), low[:, rank:].float(), b_scaled[1].float().t())
    return g, u


def ranks_of(b_scaled) -> tuple[int, int]:
    return b_scaled[0].shape[1], b_scaled[1].shape[1]


def ranks_tile(*ranks: int) -> int:
    return max(16, 1 << (max(ranks) - 1).bit_length())


def kernel_forward(gate, up, low, b_scaled, tile: tuple[int, int, int] | None = None):
    """forward's Triton kernel; `tile` (rows, columns, warps) another than the default, for
    bench/kernel_times.py."""
    rows, columns, warps = tile or (ROWS, COLUMNS, WARPS)
    ranks = ranks_of(b_scaled)
    out = torch.empty_like(gate)
    check(gate, up, low, out, *b_scaled, ranks=ranks)
    tokens, width = gate.shape
    grid = (-(-tokens // rows), -(-width // columns))
    load_triton().swiglu_forward[grid](
        gate, up, low, *b_scaled, out, tokens, width, *ranks,
        rows_per=rows, columns_per=columns, ranks_per=ranks_tile(*ranks), num_warps=warps,
    )  # fmt: skip
    return out


def kernel_backward_(grad, gate, up, low, b_scaled, deferred=None, tile=None) -> None:
    """backward_'s Triton kernel, `deferred` and `tile` as there and in kernel_forward."""
    rows, columns, warps = tile or (ROWS, COLUMNS, WARPS)
    ranks = ranks_of(b_scaled)
    check(gate, up, low, grad, *b_scaled, ranks=ranks)
    tokens, width = gate.shape
    low_grad, a_all = grad, grad  # unread without a deferred part
    if deferred is not None:
        low_grad, a_all = (t.contiguous() for t in deferred)
    rank_down = a_all.shape[0] if deferred is not None else 1
    grid = (-(-tokens // rows), -(-width // columns))
    load_triton().swiglu_backward[grid](
        gate, up, low, *b_scaled, grad, low_grad, a_all, tokens, width, *ranks, rank_down,
        rows_per=rows, columns_per=columns, ranks_per=ranks_tile(*ranks, rank_down),
        deferred=deferred is not None, num_warps=warps,
    )  # fmt: skip


def check(gate, up, low, out, *b_scaled, ranks) -> None:
    tokens, width = gate.shape
    same = up.shape == out.shape == gate.shape and low.shape == (tokens, sum(ranks))
    assert same and all(t.is_contiguous() for t in (gate, up, low, out, *b_scaled))
