"""Micro-batches for training: padded rows of similar length, or packed sequences."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from selftune.data.encode import Example
from selftune.data.pack import PackedBatch, pack_examples, pad_batch

Batch = dict[str, Any]
HOST_ONLY = ("label_tokens", "pad_tokens")  # counts for the loop: no model input, no graph key
# replay targets and where they sit among the label positions: not model inputs
TEACHER_KEYS = ("teacher_ids", "teacher_probs", "soft_index", "hard_index")


def packed_batch(pack: PackedBatch) -> Batch:
    """A pack as model inputs: restarting `position_ids` isolate conversations on eager/SDPA
    attention, and `cu_seq_lens` (transformers' flash-attention kwarg names, handed down to the
    attention function) drive the varlen kernel on CUDA (accel.kernels.attention)."""
    batch = {
        "input_ids": pack.input_ids,
        "labels": pack.labels,
        "position_ids": pack.position_ids,
        "cu_seq_lens_q": pack.cu_seqlens,
        "cu_seq_lens_k": pack.cu_seqlens,
        "max_length_q": pack.max_seqlen,
        "max_length_k": pack.max_seqlen,
    }
    if pack.teacher is not None:
        batch["teacher_ids"], batch["teacher_probs"] = pack.teacher
    return with_label_index(batch)


def label_index(labels: torch.Tensor) -> torch.Tensor:
    """Flat positions (row x width + column) of the tokens whose next token is a label: where
    the loss reads logits. Found on the host, before the batch goes to the GPU, so the loss picks
    them with an index instead of a boolean mask, whose size the GPU would have to report."""
    width = labels.shape[-1]
    rows, columns = torch.nonzero(labels[:, 1:] != -100, as_tuple=True)
    return rows * width + columns


def replay_split(teacher_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(soft, hard): which of the label positions (rows of `teacher_probs`, taken at the label
    positions) carry the base's probabilities (replay rows: KL loss) and which do not (plain
    rows: cross-entropy)."""
    soft = teacher_probs.sum(-1) > 0
    return torch.nonzero(soft).squeeze(1), torch.nonzero(~soft).squeeze(1)


def with_label_index(batch: Batch) -> Batch:
    """The batch with its `label_index`, `label_tokens` (the count of real labels, which a
    padded index would overstate) and, with replay rows, their `soft_index` / `hard_index`
    among the labels (`replay_split`): all found on the host, so the loss needs no sizes back
    from the GPU."""
    if "label_index" in batch or batch["labels"].device.type != "cpu":
        return batch
    index = label_index(batch["labels"])
    done = {**batch, "label_index": index, "label_tokens": len(index)}
    if "teacher_probs" in batch:
        probs = batch["teacher_probs"].flatten(0, 1)[index + 1]
        done["soft_index"], done["hard_index"] = replay_split(probs)
    return done


def packed(examples: list[Example], max_tokens: int) -> list[Batch]:
    """Pack rows into sequences of at most `max_tokens` tokens."""
    return [packed_batch(pack) for pack in pack_examples(examples, max_tokens)]


@dataclass
class StepRows:
    """The rows of one unpacked micro-batch, left as rows so that `assemble` can pack them with
    the rest of their optimizer step (the GPU fast path): the step trains on exactly the rows
    unpacked training would, in fewer and fuller forward passes. A pack holds at most
    `max_tokens` (see step_pack_tokens)."""

    rows: list[Example]
    max_tokens: int


def step_pack_tokens(max_length: int, batch_size: int, checkpointing: bool) -> int:
    """Tokens per step pack: the unpacked micro-batch's worst case (rows x max_length), or with
    gradient checkpointing at least 8192. Each forward/backward costs a fixed launch overhead,
    so fewer, fuller packs pay; with checkpointing an 8192-token pack needs no more memory than
    stock transformers' one 2048-token row (bench/README.md)."""
    unpacked = max_length * batch_size
    return max(unpacked, 8192) if checkpointing else unpacked


def assemble(group: list[Any]) -> list[Batch]:
    """One optimizer step's micro-batches as model inputs: StepRows packed together (in a
    fixed order, so a resumed run packs alike), ready batches as they are."""
    ready = [b for b in group if not isinstance(b, StepRows)]
    rows = [e for b in group if isinstance(b, StepRows) for e in b.rows]
    if rows:
        budget = max(b.max_tokens for b in group if isinstance(b, StepRows))
        ready += packed(rows, budget)
    return ready


def make_batches(
    examples: list[Example],
    batch_size: int,
    packing: bool,
    max_length: int,
    pad_id: int,
    pack_tokens: int = 0,
) -> tuple[Callable[[int], list[Any]], int]:
    """Return (epoch -> micro-batches, micro-batches per epoch). Unpacked rows are grouped with
    rows of similar length so padding stays small; the training loop shuffles the groups.
    `pack_tokens` > 0: the groups stay StepRows, packed per optimizer step by `assemble`
    into sequences of at most that many tokens."""
    if packing:
        batches: list[Any] = packed(examples, max_length * batch_size)
    elif pack_tokens > 0:
        batches = [StepRows(rows, pack_tokens) for rows in by_length(examples, batch_size)]
    else:
        batches = [pad_batch(rows, pad_id) for rows in by_length(examples, batch_size)]
    return (lambda epoch: batches), len(batches)


def by_length(examples: list[Example], batch_size: int) -> list[list[Example]]:
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    return [
        [examples[i] for i in order[start : start + batch_size]]
        for start in range(0, len(order), batch_size)
    ]


def largest_micro_batch(units: list[Any], per_step: int) -> int:
    """An upper bound on the tokens of any micro-batch the run will build: ready batches as
    they are, step packs at most their budget or the step's largest possible rows."""
    ready = [int(b["input_ids"].numel()) for b in units if not isinstance(b, StepRows)]
    step_rows = [b for b in units if isinstance(b, StepRows)]
    if step_rows:
        unit_tokens = sorted(
            (sum(len(e.input_ids) for e in b.rows) for b in step_rows), reverse=True
        )
        budget = max(b.max_tokens for b in step_rows)
        ready.append(min(budget, sum(unit_tokens[:per_step])))
    return max(ready, default=0)
