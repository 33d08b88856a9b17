"""Cross-entropy of a chunk of 16-bit logits in one Triton kernel, the gradient written in place.

In plain PyTorch (kernels.linear_ce) a chunk of 512 x 152k logits goes through about ten
float32 passes: the upcast, logsumexp's max, subtraction and exponent, the gather, argmax, the
softmax, the one-hot subtraction and the cast back: a large share of the loss's time
(bench/README.md). Here one program per row reads its logits twice: once for
the running max, the sum of exponents and the first argmax, once to write
`softmax - one_hot(target)` over the logits, in float32 arithmetic and the logits' dtype, zero
for rows whose target is -100. The head's GEMM then reads that gradient as it is.
"""

from __future__ import annotations

import torch

from selftune.accel.kernels import load_triton

BLOCK = 4096  # vocabulary entries a program reads at a time


def usable(logits: torch.Tensor) -> bool:
    """Where the kernel runs: 16-bit logits on a GPU, rows contiguous, Triton installed."""
    return (
        logits.is_cuda
        and logits.dtype in (torch.float16, torch.bfloat16)
        and logits.stride(-1) == 1
        and load_triton() is not None
    )


def ce_rows(
    logits: torch.Tensor, targets: torch.Tensor, write_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per row, float32; 1 where the argmax is the target, int32) of (rows, vocab) logits;
    with `write_grad`, the logits are overwritten by the gradient of the summed loss."""
    rows, vocab = logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    correct = torch.empty(rows, dtype=torch.int32, device=logits.device)
    if rows:
        load_triton().ce_rows_kernel[(rows,)](
            logits, logits.stride(0), targets, losses, correct, vocab,
            write_grad=write_grad, block=BLOCK, num_warps=8,
        )  # fmt: skip
    return losses, correct
