"""LoRA's input dropout on a GPU in Triton: the mask drawn from a seed, never stored.

PyTorch's dropout writes a bool mask beside the dropped copy, and its backward reads the mask
again, after a GEMM has written the adapter's input gradient (grad_low @ A) for it to read:
for down_proj's 18,944-wide input of 6,144 tokens that is 233 MB written and read twice more
per layer.
Here the forward writes only the dropped copy, and the backward computes
`keep * scale * (grad_low @ A)` in one pass, the rank-r product on the fly, the mask drawn
again from the same seed: its output is the only large tensor it touches.

The mask of element (row, column) comes from Philox at a counter that depends on the row and
the column's tile alone (`keep`), so the forward and the backward tile the columns alike and
draw four numbers per call. The seed is a one-element tensor drawn from PyTorch's CUDA
generator: a CUDA graph draws a new one at each replay, and a checkpointed layer's recompute,
with the generator's state restored, draws the forward's seed again.
"""

from __future__ import annotations

import torch

from selftune.accel.kernels import load_triton

# a program's tile: FORWARD_ROWS or BACKWARD_ROWS rows by four parts of PART columns (the mask
# depends on the part's width alone, so the two may tile the rows differently). Philox4x32 at 7
# rounds: the Random123 paper (Salmon et al., 2011) reports 7 passing TestU01's BigCrush, and
# recommends Triton's default of 10 as a margin, which makes the forward markedly slower
# (bench/kernel_times.py, bench/README.md)
PART = 128
FORWARD_ROWS, FORWARD_WARPS = 16, 8  # faster than 32 rows at 4 warps (bench/kernel_times.py)
BACKWARD_ROWS = 32  # tl.dot's tile: (rows, ranks) @ (ranks, part)
ROUNDS = 7
# the backward holds a group's whole stacked rank in one tile; wider groups keep PyTorch's dropout
MAX_RANK = 128


def usable(x: torch.Tensor, rank: int) -> bool:
    """16-bit rows on a GPU, few enough elements for 32-bit Philox counters, a group's stacked
    rank that one tile holds, Triton installed."""
    return (
        rank <= MAX_RANK
        and x.is_cuda
        and x.dim() == 2
        and x.dtype in (torch.float16, torch.bfloat16)
        and x.is_contiguous()
        and x.numel() < 2**31 - 4 * PART * x.shape[0]
        and load_triton() is not None
    )


def draw_seed(device: torch.device) -> torch.Tensor:
    """A Philox seed from PyTorch's generator for `device` (graph-safe, checkpoint-restored)."""
    return torch.randint(0, 2**63 - 1, (1,), device=device, dtype=torch.int64)  # Philox's key


def grid(rows: int, cols: int, rows_per: int) -> tuple[tuple[int, int], int]:
    tiles = -(-cols // (4 * PART))
    return (-(-rows // rows_per), tiles), tiles


def dropped(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """x with each element zeroed with probability p and the rest scaled by 1 / (1 - p)."""
    out = torch.empty_like(x)
    shape, tiles = grid(*x.shape, FORWARD_ROWS)
    args = (x, out, seed, x.shape[0], x.shape[1], tiles, p, 1.0 / (1.0 - p))
    load_triton().dropout_forward[shape](
        *args, rows_per=FORWARD_ROWS, part=PART, rounds=ROUNDS, num_warps=FORWARD_WARPS
    )
    return out


def input_grad(low_grad: torch.Tensor, a_all: torch.Tensor, p: float, seed: torch.Tensor):
    """The adapter's part of the input's gradient, `keep * (low_grad @ a_all) / (1 - p)`, for
    the mask `dropped` drew from `seed`: (tokens, ranks) @ (ranks, in) -> (tokens, in)."""
    low_grad, a_all = low_grad.contiguous(), a_all.contiguous()
    rows, rank = low_grad.shape
    cols = a_all.shape[1]
    out = torch.empty(rows, cols, dtype=a_all.dtype, device=a_all.device)
    shape, tiles = grid(rows, cols, BACKWARD_ROWS)
    ranks_per = max(16, 1 << (rank - 1).bit_length())
    args = (low_grad, a_all, out, seed, rows, cols, rank, tiles, p, 1.0 / (1.0 - p))
    load_triton().dropout_backward[shape](
        *args, rows_per=BACKWARD_ROWS, part=PART, ranks_per=ranks_per, rounds=ROUNDS
    )
    return out


def lora_input_grad(low_grad: torch.Tensor, a_all: torch.Tensor, p: float, mask) -> torch.Tensor:
    """The adapter's part of its input's gradient for whichever mask the forward kept: a seed
    (the kernel above), PyTorch's bool mask, or None (no dropout)."""
    if mask is not None and mask.dtype != torch.bool:
        return input_grad(low_grad, a_all, p, mask)
    grad = low_grad @ a_all
    if mask is not None:  # dropout's own backward: faster than one mixed-dtype elementwise op
        # over a bool mask and a bf16 product
        grad = torch.ops.aten.native_dropout_backward(grad, mask, 1.0 / (1.0 - p))
    return grad
