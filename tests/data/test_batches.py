"""Micro-batches: a GPU step's rows packed together train exactly as the unpacked step."""

from __future__ import annotations

import torch
from support import build_tiny_qwen2, lora_args, random_examples

from selftune.data.batches import (
    StepRows,
    assemble,
    largest_micro_batch,
    make_batches,
    step_pack_tokens,
)
from selftune.train.loop import accumulate_gradients, wrap_model
from selftune.train.plan import Plan, step_groups


def plan(grad_accum: int) -> Plan:
    return Plan(1e-3, grad_accum, 2, 2, 0, 10, 10)


def step_gradients(model, group) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, _, _ = accumulate_gradients(model, group)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_steps_train_like_unpacked_steps():
    examples = random_examples(7, 300)
    unpacked, per_epoch = make_batches(examples, 1, False, 64, pad_id=2)
    by_step, per_epoch_rows = make_batches(examples, 1, False, 64, pad_id=2, pack_tokens=64)
    assert per_epoch == per_epoch_rows == 7
    assert all(isinstance(b, StepRows) and b.max_tokens == 64 for b in by_step(0))
    model = wrap_model(build_tiny_qwen2(300).train(), lora_args())
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    steps = zip(
        step_groups(unpacked, plan(4), seed=3, start_step=0),
        step_groups(by_step, plan(4), seed=3, start_step=0),
    )
    for (_, _, padded_group), (_, _, row_group) in steps:
        packs = assemble(row_group)
        assert len(packs) < len(padded_group)  # fewer forward passes
        assert all(p["input_ids"].shape[1] <= 64 for p in packs)
        rows_in = sorted(len(r.input_ids) for g in row_group for r in g.rows)
        assert sorted(int(p["attention_mask"].sum()) for p in padded_group) == rows_in
        loss, grads = step_gradients(model, padded_group)
        packed_loss, packed_grads = step_gradients(model, packs)
        assert abs(packed_loss - loss) <= 1e-5 * abs(loss)
        for name, grad in grads.items():
            torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_ready_batches_pass_through_assemble():
    examples = random_examples(3, 300)
    batches, _ = make_batches(examples, 2, True, 64, pad_id=2)
    assert assemble(batches(0)) == batches(0)


def test_step_packs_are_bounded_by_the_unpacked_worst_case_or_8192_tokens():
    assert step_pack_tokens(2048, 1, checkpointing=False) == 2048
    assert step_pack_tokens(2048, 1, checkpointing=True) == 8192
    assert step_pack_tokens(4096, 4, checkpointing=True) == 16384


def test_largest_micro_batch_bounds_every_step_pack():
    examples = random_examples(6, 300)  # 6, 11, ..., 31 tokens
    units, _ = make_batches(examples, 1, False, 64, pad_id=2, pack_tokens=40)
    assert largest_micro_batch(units(0), per_step=2) == min(40, 31 + 26)
    assert largest_micro_batch(units(0), per_step=1) == 31
    padded, _ = make_batches(examples, 3, False, 64, pad_id=2)
    assert largest_micro_batch(padded(0), per_step=2) == 3 * 31
