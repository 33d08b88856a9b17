"""Replay toward the base model's own next-token distribution, not only its greedy tokens.

Training on the base's greedy answers (hard labels) tells the tuned model which token the base
picked at each step; the base's top-k probabilities tell it how the base ranked the others too,
a tighter hold on its general behaviour for the same rows (self-distillation, as in "Learning
without Forgetting"). The probabilities come from the untouched model, once, before training,
and travel with their rows through padding and packing; the loss at those positions is the
KL divergence from them (zero when the tuned model matches the base).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from selftune.data.encode import IGNORE_INDEX, Example

CHUNK = 1024  # label positions per chunk of soft targets (logits recomputed in backward)


@torch.no_grad()
def attach_teacher(model: Any, examples: list[Example], top_k: int) -> None:
    """Give each example the model's top-k next-token probabilities (renormalised) at its
    labelled positions; row t holds the distribution of token t given the tokens before it."""
    if top_k <= 0:
        return
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for example in examples:
        n = len(example.input_ids)
        ids = torch.tensor([example.input_ids], device=device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        labelled = torch.tensor(example.labels[1:], device=device) != IGNORE_INDEX
        probs, top = logits[labelled].softmax(-1).topk(min(top_k, logits.shape[-1]), dim=-1)
        teacher_probs = torch.zeros(n, probs.shape[-1])
        teacher_ids = torch.zeros(n, probs.shape[-1], dtype=torch.long)
        at = torch.nonzero(labelled.cpu()).squeeze(1) + 1
        teacher_probs[at] = (probs / probs.sum(-1, keepdim=True)).cpu()
        teacher_ids[at] = top.cpu()
        example.teacher_ids, example.teacher_probs = teacher_ids, teacher_probs
    model.train(was_training)


def kl_sum(log_q: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Summed KL(teacher || model) over positions: teacher top-k `ids`/`probs` against the
    model's log-probabilities `log_q` ([positions, vocab])."""
    return (probs * (probs.clamp_min(1e-12).log() - log_q.gather(1, ids))).sum()


def _kl_chunk(
    head: Any, hidden: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    log_q = head(hidden).float().log_softmax(-1)
    return kl_sum(log_q, ids, probs), log_q.argmax(-1)


def soft_target_loss(
    head: Any, hidden: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, Any]:
    """(summed KL(teacher || model) over positions, argmaxes equal to `targets`, as a tensor);
    each chunk's logits are recomputed in backward rather than kept."""
    loss = torch.zeros((), device=hidden.device)
    correct: Any = 0
    for start in range(0, hidden.shape[0], CHUNK):
        end = start + CHUNK
        part, picked = checkpoint(
            _kl_chunk,
            head,
            hidden[start:end],
            ids[start:end],
            probs[start:end],
            use_reentrant=False,
        )
        loss = loss + part
        correct = (picked == targets[start:end]).sum() + correct
    return loss, correct


def teacher_rows(examples: list[Example], width: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """[rows, width, k] teacher ids and probabilities, zero where a row has none (or padding)."""
    with_teacher = [e for e in examples if e.teacher_probs is not None]
    if not with_teacher:
        return None
    k = with_teacher[0].teacher_probs.shape[-1]
    ids = torch.zeros(len(examples), width, k, dtype=torch.long)
    probs = torch.zeros(len(examples), width, k)
    for row, example in enumerate(examples):
        if example.teacher_probs is not None:
            n = len(example.input_ids)
            ids[row, :n], probs[row, :n] = example.teacher_ids, example.teacher_probs
    return ids, probs
