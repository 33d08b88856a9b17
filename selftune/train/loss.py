"""The loss of a micro-batch: token-summed cross-entropy (or KL toward the base on replay rows)
at label positions only."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from selftune.accel.kernels.linear_ce import linear_cross_entropy
from selftune.data.batches import HOST_ONLY, TEACHER_KEYS, label_index, replay_split
from selftune.models.load import causal_lm
from selftune.train.distill import kl_sum, soft_target_loss

NOT_INPUTS = ("labels", "label_index", *HOST_ONLY, *TEACHER_KEYS)


LOGIT_CHUNK = 4096  # label positions per lm_head chunk: bounds the logits held at once


def batch_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, Any]:
    """Sum of token losses over label positions, their count, and correct argmaxes (a tensor,
    or an int where counting needed the host). The loss is cross-entropy, or where the batch
    carries the base's probabilities (replay rows) the KL divergence from them
    (selftune.train.distill). Logits are computed only at label positions, picked by the batch's
    `label_index` (batches.label_index; found here when absent); through a frozen head (LoRA)
    chunk by chunk without keeping them for backward. With `label_index` and no replay rows
    nothing here waits for the GPU, so a CUDA graph can hold it (selftune.accel.step_graphs)."""
    lm = causal_lm(model)
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k not in NOT_INPUTS}
    positions = batch.get("label_index")
    if positions is None:
        positions = label_index(labels)
    targets_at = positions + 1  # position i predicts the token at i + 1 (same row)

    def at_labels(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.flatten(0, 1)[targets_at]

    flat_targets = at_labels(labels)
    count = batch.get("label_tokens", len(flat_targets))  # padding adds ignored positions
    soft = hard = None  # which label positions are replay (KL) and which plain (CE)
    if "teacher_probs" in batch:
        teacher_ids = at_labels(batch["teacher_ids"])
        teacher_probs = at_labels(batch["teacher_probs"])
        soft, hard = batch.get("soft_index"), batch.get("hard_index")
        if soft is None:  # not split on the host (batches.with_label_index): split here
            soft, hard = replay_split(teacher_probs)
    head = lm.get_output_embeddings()
    special_head = getattr(lm.config, "final_logit_softcapping", None) or getattr(
        lm.config, "logit_scale", None
    )
    if special_head or getattr(head, "bias", None) is not None:  # let the model make logits
        logits = lm(**inputs, use_cache=False).logits.flatten(0, 1)[positions].float()
        correct = (logits.argmax(-1) == flat_targets).sum()
        if soft is None:
            return (
                F.cross_entropy(logits, flat_targets, reduction="sum"),
                count,
                correct,
            )
        log_q = logits.log_softmax(-1)
        hard_loss = F.nll_loss(log_q[hard], flat_targets[hard], reduction="sum")
        kl = kl_sum(log_q[soft], teacher_ids[soft], teacher_probs[soft])
        return hard_loss + kl, count, correct
    hidden = lm.get_decoder()(**inputs, use_cache=False).last_hidden_state.flatten(0, 1)
    hidden = hidden[positions]
    loss = torch.zeros((), device=labels.device)
    correct: Any = 0
    if soft is not None and len(soft):  # KL on replay positions, CE on the rest
        loss, correct = soft_target_loss(
            head, hidden[soft], teacher_ids[soft], teacher_probs[soft], flat_targets[soft]
        )
        hidden, flat_targets = hidden[hard], flat_targets[hard]
    if hidden.shape[0] == 0:
        return loss, count, correct
    if not head.weight.requires_grad:
        ce, ce_correct = linear_cross_entropy(hidden, head.weight, flat_targets)
        return loss + ce, count, ce_correct + correct
    for start in range(0, hidden.shape[0], LOGIT_CHUNK):
        logits = head(hidden[start : start + LOGIT_CHUNK]).float()
        part = flat_targets[start : start + LOGIT_CHUNK]
        loss = loss + F.cross_entropy(logits, part, reduction="sum")
        correct = (logits.argmax(-1) == part).sum() + correct
    return loss, count, correct


def autocast_context(device: str, dtype: torch.dtype, wanted: bool = True):
    """bf16 autocast where float32 weights meet a unit that does bf16 fast: CUDA, or a CPU with
    AMX / AVX512-BF16, where it trains a small model much faster than float32 (bench/README.md).
    Trainable LoRA weights and the optimizer stay in float32. Not `wanted` when the user asked
    for float32 by name, or under FSDP2, whose own precision policy applies (autocast over
    FSDP2's gathered weights gave wrong gradients on CPU, torch 2.13)."""
    import contextlib

    if dtype != torch.float32 or not wanted:
        return contextlib.nullcontext()
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    fast_bf16 = (
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        or getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    )
    if fast_bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class LossHead(torch.nn.Module):
    """The model and its loss as one module. Under FSDP2 this is the root, so its forward
    gathers the embeddings and output head that batch_loss uses outside the model's forward."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
        return batch_loss(self.model, batch)


def loss_of(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
    """batch_loss through the LossHead when there is one (the FSDP2 root must run forward)."""
    return model(batch) if isinstance(model, LossHead) else batch_loss(model, batch)


def label_tokens(group: list[dict[str, torch.Tensor]]) -> int:
    """Label positions of the micro-batches, counted on the host where the batch says."""
    return sum(
        b["label_tokens"] if "label_tokens" in b else int((b["labels"][:, 1:] != -100).sum())
        for b in group
    )
