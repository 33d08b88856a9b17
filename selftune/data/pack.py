"""Several conversations in one sequence, none attending to another; and the padded batch.

A pack carries per-conversation position ids (restarting at 0) and the boundary list
(`cu_seqlens`, as flash-attention's varlen kernels take it). Isolation with transformers 5:
give the model `position_ids` and NO `attention_mask` (and no KV cache: `use_cache=False`);
`masking_utils.find_packed_sequence_indices` then sees the position resets and builds a
block-diagonal causal mask for eager/sdpa/flex, and the flash-attention path reads the same
resets as varlen boundaries. `packed_attention_mask` is the explicit alternative: a 4D additive
mask, which transformers passes through unchanged to eager and sdpa attention.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from selftune.data.encode import IGNORE_INDEX, Example
from selftune.errors import SelftuneError
from selftune.train.distill import teacher_rows


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [1, T]
    labels: torch.Tensor  # [1, T], unshifted; each conversation's first token is IGNORE_INDEX
    position_ids: torch.Tensor  # [1, T], 0.. per conversation
    cu_seqlens: torch.Tensor  # [n + 1] int32: 0, end of conversation 1, ..., T
    max_seqlen: int
    teacher: tuple[torch.Tensor, torch.Tensor] | None = None  # [1, T, k] ids, probabilities


def bin_pack(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Best-fit decreasing: longest first, each into the fullest bin it still fits."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, bin index), sorted
    for i in order:
        if lengths[i] > max_tokens:
            raise SelftuneError(f"a row of {lengths[i]} tokens does not fit a pack of {max_tokens}")
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            bins.append([i])
            left, index = max_tokens - lengths[i], len(bins) - 1
        else:
            left, index = free.pop(at)
            bins[index].append(i)
            left -= lengths[i]
        bisect.insort(free, (left, index))
    return bins


def build_pack(examples: list[Example]) -> PackedBatch:
    input_ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    bounds = [0]
    for example in examples:
        n = len(example.input_ids)
        input_ids += example.input_ids
        # the first token would be the target of the previous conversation's last position
        labels += [IGNORE_INDEX, *example.labels[1:]]
        positions += range(n)
        bounds.append(bounds[-1] + n)
    width = max(len(e.input_ids) for e in examples)
    rows = teacher_rows(examples, width)
    teacher = None
    if rows is not None:  # the padded rows' real positions, row by row, as for the labels
        lengths = torch.tensor([len(e.input_ids) for e in examples])
        real = torch.arange(width)[None] < lengths[:, None]
        teacher = (rows[0][real][None], rows[1][real][None])
    return PackedBatch(
        input_ids=torch.tensor([input_ids], dtype=torch.long),
        labels=torch.tensor([labels], dtype=torch.long),
        position_ids=torch.tensor([positions], dtype=torch.long),
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
        max_seqlen=width,
        teacher=teacher,
    )


def pack_examples(examples: list[Example], max_tokens: int) -> list[PackedBatch]:
    """Packs of at most `max_tokens` tokens each; every example in exactly one pack."""
    bins = bin_pack([len(e.input_ids) for e in examples], max_tokens)
    return [build_pack([examples[i] for i in members]) for members in bins]


def packed_inputs(pack: PackedBatch) -> dict[str, torch.Tensor]:
    """Model inputs (plus labels) for a pack: isolation comes from the position resets."""
    return {"input_ids": pack.input_ids, "labels": pack.labels, "position_ids": pack.position_ids}


def sequence_ids(position_ids_or_cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[T] index of the conversation each token belongs to."""
    tensor = position_ids_or_cu_seqlens
    if tensor.dim() == 1:  # cu_seqlens
        lengths = (tensor[1:] - tensor[:-1]).long()
        return torch.repeat_interleave(torch.arange(len(lengths), device=tensor.device), lengths)
    positions = tensor.reshape(-1)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[1:] = positions[1:] != positions[:-1] + 1
    return starts.long().cumsum(0) - 1


def packed_attention_mask(
    position_ids_or_cu_seqlens: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[1, 1, T, T] additive mask (0 = attend, dtype's min = blocked): causal within each
    conversation, nothing across them. Pass as `attention_mask` to eager or sdpa attention."""
    seq = sequence_ids(position_ids_or_cu_seqlens)
    n = seq.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool, device=seq.device).tril()
    allowed = causal & (seq[:, None] == seq[None, :])
    mask = torch.zeros(n, n, dtype=dtype, device=seq.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def pad_batch(examples: list[Example], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rows for the unpacked path; padding has no labels and no attention."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    teacher = teacher_rows(examples, width)
    if teacher is not None:
        batch["teacher_ids"], batch["teacher_probs"] = teacher
    return batch
