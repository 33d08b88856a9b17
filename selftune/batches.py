"""Micro-batches for training: padded rows of similar length, or packed sequences."""

from __future__ import annotations

from collections.abc import Callable

import torch

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


def packed(examples: list[Example], max_tokens: int) -> list[Batch]:
    """Several conversations per sequence, none attending to another (see data.pack)."""
    from selftune.data.pack import pack_examples, packed_inputs

    return [packed_inputs(pack) for pack in pack_examples(examples, max_tokens)]


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
