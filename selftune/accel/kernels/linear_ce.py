"""Cross-entropy through the output layer, chunk by chunk, never holding the full logits.

For a 152k vocabulary the logits of 2048 label positions take 1.2 GB in float32, and autograd
would keep them for backward. Here the forward pass computes, per chunk of positions, the loss
and the gradient with respect to the hidden states (softmax minus one-hot, through the frozen
head), keeps only that gradient (positions x hidden), and backward scales it. On a GPU with
Triton, each chunk's loss and gradient come from one kernel (kernels.ce_rows); elsewhere from
the plain-PyTorch version here, which runs everywhere.
"""

from __future__ import annotations

import torch

from selftune.accel.kernels import ce_rows

IGNORE_INDEX = -100
CHUNK = 512  # label positions per chunk: 512 x 152k float32 logits = 0.3 GB at a time


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over positions of CE(hidden @ weight.T, target), targets of -100 left out; the head
    weight gets no gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        acc = torch.promote_types(hidden.dtype, torch.float32)  # bf16 logits are upcast
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        for start in range(0, hidden.shape[0], chunk):
            part = hidden[start : start + chunk]
            target = targets[start : start + chunk]
            logits = part @ weight.t()
            if ce_rows.usable(logits):  # one kernel over the chunk; gradient in place
                losses, hits = ce_rows.ce_rows(logits, target, grad_hidden is not None)
                loss += losses.sum()
                correct += hits.sum()
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk] = logits @ weight
                continue
            valid = target != IGNORE_INDEX  # padding (accel.step_graphs) counts for nothing
            safe = target.clamp(min=0)
            logits = logits.to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            loss += ((lse - logits.gather(1, safe[:, None]).squeeze(1)) * valid).sum()
            correct += (logits.argmax(-1) == target).sum()
            if grad_hidden is not None:
                probs = (logits - lse[:, None]).exp_()
                probs[torch.arange(len(target), device=probs.device), safe] -= 1.0
                rows = probs.to(weight.dtype) @ weight
                grad_hidden[start : start + chunk] = (rows * valid[:, None]).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden if grad_hidden is not None else torch.empty(0))
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_correct: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        if grad_hidden.numel() == 0:
            return None, None, None, None
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, correct argmax count) over label positions, through a frozen head; the
    count stays on the device, so that nothing waits for the GPU before backward."""
    if weight.requires_grad:
        raise ValueError("the chunked cross-entropy gives the output layer no gradient")
    loss, correct = ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk)
    return loss, correct
