"""The plan of a run: learning rate, steps, warm-up and schedule from the settings, the data's
size and the model's; each step's micro-batches in a seeded order."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from selftune.errors import SelftuneError
from selftune.train.job import TrainSettings, default_learning_rate


@dataclass
class Plan:
    """Hyperparameters resolved from flags, data size and model size."""

    learning_rate: float
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_steps: int
    save_steps: int
    ranks: int = 1  # processes; each optimizer step takes grad_accum micro-batches from each

    @property
    def per_step(self) -> int:
        return self.grad_accum * self.ranks


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def make_plan(
    settings: TrainSettings, micro_batches_per_epoch: int, n_params: int, ranks: int = 1
) -> Plan:
    """As ms-swift: the global batch is rows per micro-batch x accumulation x processes."""
    grad_accum = settings.gradient_accumulation_steps or max(
        1, math.ceil(16 / settings.per_device_train_batch_size)
    )
    steps_per_epoch = max(1, math.ceil(micro_batches_per_epoch / (grad_accum * ranks)))
    if settings.max_steps and settings.max_steps > 0:
        total = settings.max_steps
    else:
        total = max(1, math.ceil(steps_per_epoch * settings.num_train_epochs))
    lr = settings.learning_rate or default_learning_rate(settings.train_type, n_params)
    return Plan(
        learning_rate=lr,
        grad_accum=grad_accum,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=math.ceil(total * settings.warmup_ratio),
        eval_steps=settings.eval_steps or settings.save_steps,
        save_steps=settings.save_steps,
        ranks=ranks,
    )


def lr_lambda(plan: Plan, kind: str):
    def factor(step: int) -> float:
        if step < plan.warmup_steps:
            return (step + 1) / (plan.warmup_steps + 1)
        progress = (step - plan.warmup_steps) / max(1, plan.total_steps - plan.warmup_steps)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    if kind not in ("cosine", "linear", "constant"):
        raise SelftuneError(f"--lr_scheduler_type {kind}: use cosine, linear or constant")
    return factor


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def step_groups(
    micro_batches: Any, plan: Plan, seed: int, start_step: int
) -> Iterator[tuple[int, float, list]]:
    """Yield (step, epoch, micro-batches) from `start_step`: each epoch's micro-batches in a
    seeded order, cut into groups of grad_accum x ranks (every rank's share of the step). The
    order depends only on seed and epoch, so a resumed run, with any number of processes, sees
    exactly the batches the uninterrupted run would have."""
    step = 0
    epoch = 0
    while True:
        batches = micro_batches(epoch)
        order = epoch_order(len(batches), seed, epoch)
        for start in range(0, len(order), plan.per_step):
            if step >= plan.total_steps:
                return
            if step >= start_step:
                group = [batches[i] for i in order[start : start + plan.per_step]]
                yield step, epoch + (start + len(group)) / len(order), group
            step += 1
        epoch += 1
