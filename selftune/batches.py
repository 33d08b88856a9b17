"""Micro-batches for training: padded rows of similar length, or packed sequences."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from selftune.data.encode import Example
from selftune.data.pack import PackedBatch, pack_examples, pad_batch

Batch = dict[str, Any]


def packed_batch(pack: PackedBatch) -> Batch:
    """A pack as model inputs: restarting `position_ids` isolate conversations on eager/SDPA
    attention, and `cu_seq_lens` (transformers' flash-attention kwarg names, handed down to the
    attention function) drive the varlen kernel on CUDA (kernels.attention)."""
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
    return batch


def packed(examples: list[Example], max_tokens: int) -> list[Batch]:
    """Pack rows into sequences of at most `max_tokens` tokens."""
    return [packed_batch(pack) for pack in pack_examples(examples, max_tokens)]


def make_batches(
    examples: list[Example], batch_size: int, packing: bool, max_length: int, pad_id: int
) -> tuple[Callable[[int], list[Batch]], int]:
    """Return (epoch -> micro-batches, micro-batches per epoch). Unpacked rows are grouped with
    rows of similar length so padding stays small; the training loop shuffles the groups."""
    if packing:
        batches = packed(examples, max_length * batch_size)
    else:
        by_length = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        batches = [
            pad_batch([examples[i] for i in by_length[start : start + batch_size]], pad_id)
            for start in range(0, len(by_length), batch_size)
        ]
    return (lambda epoch: batches), len(batches)
