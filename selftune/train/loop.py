"""The training loop: setup, then fit (step, log, eval, save). Plain PyTorch, no Trainer.

The loss of an optimizer step is the mean over every label token of all its micro-batches (not
the mean of micro-batch means), and logits are computed only where there are labels. The GPU
fast path is reached through one interface, accel.runner: `enable` patches the model and gives
the StepRunner that runs each pass.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selftune.accel import runner as accel
from selftune.accel.step_graphs import eager_pass
from selftune.data.batches import StepRows, assemble, largest_micro_batch
from selftune.errors import SelftuneError
from selftune.models.load import causal_lm
from selftune.train.checkpoint import (
    TrainingState,
    list_checkpoints,
    load_trained_weights,
    load_training_state,
    rotate_checkpoints,
    save_checkpoint,
)
from selftune.train.distributed import Ranks, all_sum, rank_share, ranks, shard
from selftune.train.job import TrainJob, TrainSettings
from selftune.train.loss import LossHead, autocast_context, label_tokens, loss_of
from selftune.train.plan import Plan, count_parameters, lr_lambda, make_plan, step_groups
from selftune.train.runlog import (
    LossWindow,
    append_log,
    memory_gib,
    plot_loss,
    read_log,
    restart_log,
)

log = logging.getLogger(__name__)


def wrap_model(model: Any, settings: TrainSettings) -> Any:
    """LoRA/DoRA through PEFT, or all weights trainable for a full fine-tune."""
    if settings.train_type == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    targets = settings.target_modules
    config = LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules="all-linear"
        if targets in (("all-linear",), ("all_linear",))
        else list(targets),
        use_dora=settings.train_type == "dora",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise SelftuneError(f"--target_modules {' '.join(targets)}: {exc}") from exc


def make_optimizer(
    params: list[torch.nn.Parameter], lr: float, weight_decay: float, sharded: bool = False
) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters, as the HF Trainer's default) where every
    parameter is a plain CUDA tensor; the multi-tensor version on CPU and under FSDP2 (the fused
    kernel on sharded tensors is untried)."""
    fused = not sharded and bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def backward_step(
    model: Any,
    group: list[dict[str, torch.Tensor]],
    total_tokens: int | None = None,
    scale: float = 1.0,
    stand_ins: int = 0,
    graphs: Any = None,
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Backward over one optimizer step's micro-batches. Each micro-batch's summed loss is
    divided by the label tokens of the whole step (`total_tokens`: over every rank), so the
    gradient is that of the token mean over the step, whatever the micro-batch sizes. `scale`
    undoes FSDP's mean over ranks; the last `stand_ins` batches count for nothing. `graphs` (an
    accel StepRunner or StepGraphs) runs each pass, eager or replayed; without it each runs
    eagerly. Returns (loss sum, tokens,
    correct) of this rank's real batches, the sums as device tensors: nothing here waits for
    the GPU, so the caller can queue the optimizer step before it reads them."""
    real = len(group) - stand_ins
    own_tokens = label_tokens(group[:real])
    n_tokens = own_tokens if total_tokens is None else total_tokens
    loss_total: Any = 0.0
    correct_total: Any = 0
    for i, batch in enumerate(group):
        weight = scale if i < real else 0.0
        factor = weight / max(1, n_tokens)
        if graphs is not None:
            loss_sum, correct = graphs.backward(batch, factor)
        else:
            loss_sum, correct = eager_pass(lambda b: loss_of(model, b), batch, factor)
        if i < real:
            loss_total = loss_sum.double() + loss_total
            correct_total = correct + correct_total
    return torch.as_tensor(loss_total), own_tokens, torch.as_tensor(correct_total)


def accumulate_gradients(
    model: Any, group: list[dict[str, torch.Tensor]], *args: Any, **kwargs: Any
) -> tuple[float, int, int]:
    """`backward_step`, its sums read as numbers."""
    loss, tokens, correct = backward_step(model, group, *args, **kwargs)
    return float(loss), tokens, int(correct)


@torch.no_grad()
def evaluate(model: Any, batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """Every rank evaluates every batch (the eval set is small), so all agree on the result."""
    model.eval()
    loss_sum, count, correct = 0.0, 0, 0
    for batch in batches:
        loss, n, ok = loss_of(model, batch)
        loss_sum, count, correct = loss_sum + float(loss), count + n, correct + int(ok)
    model.train()
    return loss_sum / max(1, count), correct / max(1, count)


def to_device(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class Session:
    """What the loop holds while it runs."""

    model: Any  # with its adapters (PEFT), or the whole model for a full fine-tune
    step_model: LossHead  # model and loss as one module: the FSDP2 root under torchrun
    runner: accel.StepRunner
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    plan: Plan
    state: TrainingState
    device: str
    where: Ranks
    autocast: bool  # bf16 autocast over float32 weights (train.loss.autocast_context)
    weight_dtype: torch.dtype


def setup(job: TrainJob) -> Session:
    """Adapters, the fast path, resumed weights, sharding, optimizer and schedule."""
    settings, where = job.settings, ranks()
    device = str(next(job.model.parameters()).device)
    n_params = count_parameters(job.model)
    plan = make_plan(settings, job.micro_batches_per_epoch, n_params, where.world)
    model = wrap_model(job.model, settings)
    first_epoch = job.train_batches(0)
    runner = accel.enable(
        causal_lm(model),
        device,
        packed=settings.packing or any(isinstance(b, StepRows) for b in first_epoch),
        several=where.active,
        largest_tokens=largest_micro_batch(first_epoch, plan.per_step),
        gradient_checkpointing=settings.gradient_checkpointing,
        cuda_graphs=settings.cuda_graphs,
        train_type=settings.train_type,
    )
    checkpoint = settings.resume_from_checkpoint
    if checkpoint is not None:  # weights go in whole, before FSDP2 shards them
        load_trained_weights(model, checkpoint, settings.full_model)
    step_model = LossHead(model)
    if where.active:
        shard(step_model, model)
        log.info("FSDP2 over %d processes", where.world)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    runner.bind(lambda b: loss_of(step_model, b), model, trainable)
    optimizer = make_optimizer(trainable, plan.learning_rate, settings.weight_decay, where.active)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(plan, settings.lr_scheduler_type)
    )
    state = TrainingState(step=0, epoch=0.0, micro_batches_done=0)
    if checkpoint is not None:
        state = load_training_state(checkpoint, model, optimizer, scheduler)
        log.info("resumed from %s at step %d", checkpoint, state.step)
    if where.main:
        restart_log(job.run_dir, state.step)
    log.info(
        "training %s: %d steps (%d micro-batches an epoch, up to %d per step), lr %.2g, %.2fM "
        "trainable parameters",
        settings.train_type,
        plan.total_steps,
        job.micro_batches_per_epoch,
        plan.grad_accum,
        plan.learning_rate,
        sum(p.numel() for p in trainable) / 1e6,
    )
    autocast = settings.autocast and not where.active
    weight_dtype = next(model.parameters()).dtype
    return Session(
        model,
        step_model,
        runner,
        trainable,
        optimizer,
        scheduler,
        plan,
        state,
        device,
        where,
        autocast,
        weight_dtype,
    )


def train(job: TrainJob) -> Path:
    """Run the optimisation; return the last checkpoint."""
    session = setup(job)
    try:
        last = fit(job, session)
    finally:
        session.runner.close()
    records = read_log(job.run_dir) if session.where.main else []
    if records:
        plot_loss(records, job.run_dir / "train_loss.png")
    if last is None:  # resumed at the very end: nothing left to do
        last = list_checkpoints(job.run_dir)[-1][1]
    return last


@dataclass(frozen=True)
class StepResult:
    """One optimizer step's numbers, summed over ranks."""

    loss_sum: float
    label_tokens: int
    correct: int
    grad_norm: float
    input_tokens: int


def train_step(s: Session, group: list[Any], max_grad_norm: float) -> StepResult:
    """One optimizer step over a step's micro-batches (every rank's share)."""
    group = assemble(group)
    n_tokens = label_tokens(group)  # the whole step's, every rank's share included
    mine, stand_ins = rank_share(group, s.where.rank, s.where.world)
    mine = [to_device(s.runner.prepare(b), s.device) for b in mine]
    with autocast_context(s.device, s.weight_dtype, s.autocast):
        loss_sum, _, correct_sum = backward_step(
            s.step_model, mine, n_tokens, float(s.where.world), stand_ins, s.runner
        )
    norm = torch.nn.utils.clip_grad_norm_(s.trainable, max_grad_norm)
    # queued behind the passes; the numbers are read after, so the GPU never waits for the
    # host between a step's passes and its update
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=not s.runner.keeps_gradients)
    step_loss, correct = all_sum([float(loss_sum), float(correct_sum)])
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    input_tokens = sum(int(b["input_ids"].numel()) for b in group)
    return StepResult(step_loss, n_tokens, int(correct), grad_norm, input_tokens)


def fit(job: TrainJob, s: Session) -> Path | None:
    """The loop: step, log, evaluate, save; returns the last checkpoint written."""
    from tqdm import tqdm

    settings, plan, state, run_dir = job.settings, s.plan, s.state, job.run_dir
    started = time.perf_counter()
    window = LossWindow(**(state.window or {}))
    tokens_seen, last_checkpoint = 0, None
    bar = tqdm(
        total=plan.total_steps,
        initial=state.step,
        desc="train",
        unit="step",
        file=sys.stderr,
        disable=not s.where.main,
    )
    with bar:  # closed (its line ended) before an error is printed
        for step, epoch, group in step_groups(job.train_batches, plan, settings.seed, state.step):
            result = train_step(s, group, settings.max_grad_norm)
            step_loss, n_tokens = result.loss_sum, result.label_tokens
            if not math.isfinite(step_loss):  # these weights are never saved: the run stops here
                # the weights that gave this loss are the previous step's: its checkpoint is bad too
                raise diverged(run_dir, f"the loss became {step_loss} at step {step + 1}", step)
            window.add(step_loss, n_tokens, result.correct)
            tokens_seen += result.input_tokens
            done = step + 1
            state.step, state.epoch = done, epoch
            elapsed = time.perf_counter() - started
            lr = s.scheduler.get_last_lr()[0]
            bar.set_postfix(
                loss=f"{step_loss / max(1, n_tokens):.4f}",
                lr=f"{lr:.2e}",
                tok_s=f"{tokens_seen / elapsed:.0f}",
            )
            bar.update(1)
            record: dict[str, Any] = {}
            if done % settings.logging_steps == 0 or done == 1 or done == plan.total_steps:
                record = {
                    **window.take(),
                    "grad_norm": round(result.grad_norm, 6),
                    "learning_rate": lr,
                    "epoch": round(epoch, 4),
                    "step": done,
                    "elapsed": round(elapsed, 3),
                    "tokens_per_s": round(tokens_seen / elapsed, 1),
                    "memory_gib": round(memory_gib(s.device), 3),
                }
            at_save = done % plan.save_steps == 0 or done == plan.total_steps
            if job.eval_batches and (done % plan.eval_steps == 0 or done == plan.total_steps):
                eval_loss, eval_acc = evaluate_session(job, s)
                record.update(
                    step=done, eval_loss=round(eval_loss, 6), eval_token_acc=round(eval_acc, 6)
                )
                if at_save and (state.best_eval_loss is None or eval_loss < state.best_eval_loss):
                    state.best_eval_loss, state.best_checkpoint = eval_loss, f"checkpoint-{done}"
            if record and s.where.main:
                append_log(run_dir, record)
            if at_save:
                state.window = dataclasses.asdict(window)
                last_checkpoint = save(job, s, done)
    return last_checkpoint


def evaluate_session(job: TrainJob, s: Session) -> tuple[float, float]:
    with autocast_context(s.device, s.weight_dtype, s.autocast):
        return evaluate(s.step_model, [to_device(b, s.device) for b in job.eval_batches])


def diverged(run_dir: Path, what: str, before_step: int) -> SelftuneError:
    """The error that stops a diverged run, naming the newest checkpoint saved before
    `before_step`: the last whose weights gave a finite loss."""
    good = [path for step, path in list_checkpoints(run_dir) if step < before_step]
    hint = f"the last good checkpoint is {good[-1]}" if good else "no good checkpoint was saved"
    later = [path.name for step, path in list_checkpoints(run_dir) if step >= before_step]
    if later:
        hint += f" ({', '.join(later)} holds the weights that diverged: do not use it)"
    return SelftuneError(f"{what}; {hint}")


def non_finite(tensors: list[torch.Tensor]) -> int:
    """How many of `tensors` hold a NaN or an infinity (each rank's own shard)."""
    bad = 0
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        bad += int(not bool(torch.isfinite(local).all()))
    return bad


def check_finite(s: Session, run_dir: Path, step: int) -> None:
    """A checkpoint is written only from finite weights and optimizer state."""
    state = [t for entry in s.optimizer.state.values() for t in entry.values()]
    tensors = s.trainable + [t for t in state if torch.is_tensor(t) and t.is_floating_point()]
    (bad,) = all_sum([float(non_finite(tensors))])
    if bad:
        what = f"the weights or optimizer state became non-finite (NaN or inf) at step {step}"
        raise diverged(run_dir, what, step)


def save(job: TrainJob, s: Session, step: int) -> Path:
    """checkpoint-STEP, then the rotation to --save_total_limit."""
    settings = job.settings
    check_finite(s, job.run_dir, step)
    path = save_checkpoint(
        job.run_dir,
        step,
        s.model,
        job.tokenizer,
        s.optimizer,
        s.scheduler,
        s.state,
        job.record,
        full_model=settings.full_model,
        adapter_scale=settings.adapter_scale,
    )
    if s.where.main:
        rotate_checkpoints(job.run_dir, settings.save_total_limit, s.state.best_checkpoint)
    return path
