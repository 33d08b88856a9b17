"""Micro-batches for training: padded rows of similar length, or packed sequences."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from selftune.data.encode import Example

Batch = dict[str, torch.Tensor]


def padded(examples: list[Example], pad_id: int) -> Batch:
    """Right-padded rows; padding has no labels and no attention."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def bins_first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices grouped so each group's total length fits `capacity`."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[index] <= free:
                bins[b].append(index)
                room[b] -= lengths[index]
                break
        else:
            bins.append([index])
            room.append(capacity - lengths[index])
    return bins


def packed_batch(examples: list[Example]) -> Batch:
    """One row of several conversations: positions restart at 0 for each, and `cu_seq_lens`
    marks the boundaries (transformers' flash-attention kwargs names, which the attention
    function receives). Without a varlen kernel, transformers builds a block-diagonal mask from
    the restarting `position_ids`; either way no conversation attends to another."""
    ids = [t for e in examples for t in e.input_ids]
    labels = [t for e in examples for t in e.labels]
    positions = [p for e in examples for p in range(len(e.input_ids))]
    bounds = [0]
    for e in examples:
        bounds.append(bounds[-1] + len(e.input_ids))
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = max(len(e.input_ids) for e in examples)
    return {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def packed(examples: list[Example], max_tokens: int) -> list[Batch]:
    """Pack rows into sequences of at most `max_tokens` (a longer row stays alone)."""
    groups = bins_first_fit([len(e.input_ids) for e in examples], max_tokens)
    return [packed_batch([examples[i] for i in group]) for group in groups]


def make_batches(
    examples: list[Example], batch_size: int, packing: bool, max_length: int, pad_id: int
) -> tuple[Callable[[int], list[Batch]], int]:
    """Return (epoch -> micro-batches, micro-batches per epoch). Rows are grouped with rows of
    similar length so padding stays small; the training loop shuffles the groups each epoch."""
    if packing:
        batches = packed(examples, max_length * batch_size)
    else:
        by_length = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        batches = [
            padded([examples[i] for i in by_length[start : start + batch_size]], pad_id)
            for start in range(0, len(by_length), batch_size)
        ]
    return (lambda epoch: batches), len(batches)
