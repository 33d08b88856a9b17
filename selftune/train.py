"""The training loop: setup, step, eval, save. Plain PyTorch, no Trainer.

The loss of an optimizer step is the mean over every label token of all its micro-batches (not
the mean of micro-batch means), and logits are computed only where there are labels.
"""

from __future__ import annotations

import json
import logging
import math
import random
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from selftune.batches import (
    HOST_ONLY,
    TEACHER_KEYS,
    StepRows,
    assemble,
    label_index,
    largest_micro_batch,
    replay_split,
    with_label_index,
)
from selftune.checkpoint import (
    TrainingState,
    list_checkpoints,
    load_training_state,
    rotate_checkpoints,
    save_checkpoint,
)
from selftune.distill import kl_sum, soft_target_loss
from selftune.errors import SelftuneError
from selftune.fast_path import (
    choose_checkpointing,
    disable_fast_path,
    enable_fast_path,
    set_checkpointing,
)
from selftune.kernels.linear_ce import linear_cross_entropy
from selftune.step_graphs import StepGraphs, eager_pass, planned_tokens

log = logging.getLogger(__name__)
NOT_INPUTS = ("labels", "label_index", *HOST_ONLY, *TEACHER_KEYS)
LOGIT_CHUNK = 4096  # label positions per lm_head chunk: bounds the logits held at once


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


def default_learning_rate(train_type: str, n_params: int) -> float:
    """ms-swift's defaults, except that LoRA on models under 1B parameters learns at 1e-3:
    with 1e-4 a 135M model needs many more epochs to take an identity."""
    if train_type == "full":
        return 1e-5
    return 1e-3 if n_params < SMALL_MODEL else 1e-4


SMALL_MODEL = 1_000_000_000
MIN_ROWS_SEEN = 480  # small models: at least 30 optimizer steps of 16 rows


def resolve_defaults(args: Any, n_params: int, n_rows: int) -> None:
    """Fill the flags the user left unset. ms-swift's defaults (1 row per micro-batch, 16 rows per
    step, 3 epochs, lr 1e-4) are made for 7B models on a GPU. A model under 1B parameters, on a
    CPU, learns an identity faster with 16-row micro-batches (one forward instead of 16), lr 1e-3
    and as many epochs as it takes to see 480 rows: one epoch of the built-in identity set (842
    rows) or 60 of the tutorial's 8 rows. Measured on SmolLM2-135M: README, "Defaults"."""
    small = n_params < SMALL_MODEL
    if args.per_device_train_batch_size is None:
        args.per_device_train_batch_size = 16 if small else 1
    if args.num_train_epochs is None:
        args.num_train_epochs = (
            float(max(1, math.ceil(MIN_ROWS_SEEN / max(1, n_rows)))) if small else 3.0
        )
    if args.learning_rate is None:
        args.learning_rate = default_learning_rate(args.train_type, n_params)


def make_plan(args: Any, micro_batches_per_epoch: int, n_params: int, ranks: int = 1) -> Plan:
    """As ms-swift: the global batch is rows per micro-batch x accumulation x processes."""
    grad_accum = args.gradient_accumulation_steps or max(
        1, math.ceil(16 / args.per_device_train_batch_size)
    )
    steps_per_epoch = max(1, math.ceil(micro_batches_per_epoch / (grad_accum * ranks)))
    if args.max_steps and args.max_steps > 0:
        total = args.max_steps
    else:
        total = max(1, math.ceil(steps_per_epoch * args.num_train_epochs))
    lr = args.learning_rate or default_learning_rate(args.train_type, n_params)
    # (resolve_defaults fills learning_rate for `sft`; this covers direct callers)
    return Plan(
        learning_rate=lr,
        grad_accum=grad_accum,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=math.ceil(total * args.warmup_ratio),
        eval_steps=args.eval_steps or args.save_steps,
        save_steps=args.save_steps,
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


def wrap_model(model: Any, args: Any) -> Any:
    """LoRA/DoRA through PEFT, or all weights trainable for a full fine-tune."""
    if args.train_type == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    targets = args.target_modules
    config = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules="all-linear" if targets in (["all-linear"], ["all_linear"]) else targets,
        use_dora=args.train_type == "dora",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise SelftuneError(f"--target_modules {' '.join(targets)}: {exc}") from exc


def step_graphs_fit(args: Any, device: str, several: bool, dtype: torch.dtype) -> bool:
    """Whether training passes may replay as CUDA graphs: LoRA on one CUDA device, weights
    already in the compute dtype (autocast's weight cache outlives a capture). Checkpointed
    layers replay too: their recompute draws the forward's dropout masks again
    (tests/test_step_graphs.py, on a GPU)."""
    return (
        bool(getattr(args, "cuda_graphs", True))
        and device.startswith("cuda")
        and not several
        and getattr(args, "train_type", "lora") == "lora"
        and dtype != torch.float32
    )


def causal_lm(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def batch_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, Any]:
    """Sum of token losses over label positions, their count, and correct argmaxes (a tensor,
    or an int where counting needed the host). The loss is cross-entropy, or where the batch
    carries the base's probabilities (replay rows) the KL divergence from them
    (selftune.distill). Logits are computed only at label positions, picked by the batch's
    `label_index` (batches.label_index; found here when absent); through a frozen head (LoRA)
    chunk by chunk without keeping them for backward. With `label_index` and no replay rows
    nothing here waits for the GPU, so a CUDA graph can hold it (selftune.step_graphs)."""
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
    AMX / AVX512-BF16 (about twice the float32 training speed of a 135M model on 2 cores).
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


def memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


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
    undoes FSDP's mean over ranks; the last `stand_ins` batches count for nothing. `graphs`
    (step_graphs.StepGraphs) replays micro-batches it has captured. Returns (loss sum, tokens,
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


def plot_loss(records: list[dict[str, Any]], path: Path) -> None:
    """The loss curve as a PNG, drawn by matplotlib's Agg without pyplot (no GUI backend, no
    global figure state)."""
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def append_log(run_dir: Path, record: dict[str, Any]) -> None:
    with (run_dir / "logging.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def read_log(run_dir: Path, up_to_step: int | None = None) -> list[dict[str, Any]]:
    path = run_dir / "logging.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if up_to_step is None or r["step"] <= up_to_step]


def to_device(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def load_trained_weights(model: Any, checkpoint: Path, full_model: bool) -> None:
    """A checkpoint's trained weights into the (not yet sharded) model, to resume from."""
    from safetensors.torch import load_file

    if full_model:
        weights = {}
        for shard_file in sorted(checkpoint.glob("*.safetensors")):
            if shard_file.name.startswith("model"):
                weights.update(load_file(str(shard_file)))
        causal_lm(model).load_state_dict(weights, strict=False)
        return
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, load_file(str(checkpoint / "adapter_model.safetensors")))


def train(
    model: Any,
    tokenizer: Any,
    train_batches: Any,
    micro_batches_per_epoch: int,
    eval_batches: list[dict[str, torch.Tensor]],
    args: Any,
    run_dir: Path,
    args_dict: dict[str, Any],
) -> Path:
    """Run the optimisation; return the last checkpoint. `train_batches(epoch)` gives that
    epoch's micro-batches (dicts of tensors)."""
    from tqdm import tqdm

    from selftune.distributed import all_sum, rank_share, ranks, shard

    where = ranks()
    device = str(next(model.parameters()).device)
    plan = make_plan(args, micro_batches_per_epoch, count_parameters(model), where.world)
    model = wrap_model(model, args)
    packed = args.packing or any(isinstance(b, StepRows) for b in train_batches(0))
    enabled = enable_fast_path(causal_lm(model), device, packed)
    if enabled:
        log.info("fast path: %s", ", ".join(enabled))
    largest = largest_micro_batch(train_batches(0), plan.per_step)
    graphed = step_graphs_fit(args, device, where.active, next(model.parameters()).dtype)
    largest, graph_tokens = planned_tokens(largest) if graphed else (largest, 0)
    layers, said = choose_checkpointing(
        causal_lm(model), args.gradient_checkpointing, device, largest, graph_tokens
    )
    log.info("memory: %s", said)
    set_checkpointing(causal_lm(model), layers)
    checkpoint = Path(args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    if checkpoint is not None:  # weights go in whole, before FSDP2 shards them
        load_trained_weights(model, checkpoint, args.train_type == "full")
    step_model = LossHead(model)
    if where.active:
        shard(step_model, model)
        log.info("FSDP2 over %d processes", where.world)
    model.train()
    weight_dtype = next(model.parameters()).dtype
    autocast = getattr(args, "torch_dtype", None) in (None, "auto") and not where.active
    trainable = [p for p in model.parameters() if p.requires_grad]
    graphs = StepGraphs(lambda b: loss_of(step_model, b), model, trainable) if graphed else None
    optimizer = make_optimizer(trainable, plan.learning_rate, args.weight_decay, where.active)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(plan, args.lr_scheduler_type)
    )
    state = TrainingState(step=0, epoch=0.0, micro_batches_done=0)
    if checkpoint is not None:
        state = load_training_state(checkpoint, model, optimizer, scheduler)
        log.info("resumed from %s at step %d", checkpoint, state.step)
    if where.main:
        records = read_log(run_dir, state.step)
        (run_dir / "logging.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    n_trainable = sum(p.numel() for p in trainable)
    log.info(
        "training %s: %d steps (%d micro-batches an epoch, up to %d per step), lr %.2g, %.2fM "
        "trainable parameters",
        args.train_type,
        plan.total_steps,
        micro_batches_per_epoch,
        plan.grad_accum,
        plan.learning_rate,
        n_trainable / 1e6,
    )
    started = time.perf_counter()
    window = {"loss": 0.0, "tokens": 0, "correct": 0}
    tokens_seen = 0
    last_checkpoint: Path | None = None
    bar = tqdm(
        total=plan.total_steps,
        initial=state.step,
        desc="train",
        unit="step",
        file=sys.stderr,
        disable=not where.main,
    )
    prepare = with_label_index if graphs is None else graphs.prepare
    for step, epoch, group in step_groups(train_batches, plan, args.seed, state.step):
        group = assemble(group)
        n_tokens = label_tokens(group)  # the whole step's, every rank's share included
        mine, stand_ins = rank_share(group, where.rank, where.world)
        mine = [to_device(prepare(b), device) for b in mine]
        with autocast_context(device, weight_dtype, autocast):
            loss_sum, _, correct_sum = backward_step(
                step_model, mine, n_tokens, float(where.world), stand_ins, graphs
            )
        norm = torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
        # queued behind the passes; the numbers are read after, so the GPU never waits for the
        # host between a step's passes and its update
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=graphs is None)  # graphs add into the same tensors
        step_loss, correct = all_sum([float(loss_sum), float(correct_sum)])
        correct = int(correct)
        window["correct"] += correct
        if not math.isfinite(step_loss):  # these weights are never saved: the run stops here
            good = list_checkpoints(run_dir)
            hint = f"; the last good checkpoint is {good[-1][1]}" if good else ""
            raise SelftuneError(f"the loss became {step_loss} at step {step + 1}{hint}")
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        window["loss"] += step_loss
        window["tokens"] += n_tokens
        tokens_seen += sum(int(b["input_ids"].numel()) for b in group)
        done = step + 1
        state.step, state.epoch = done, epoch
        elapsed = time.perf_counter() - started
        lr = scheduler.get_last_lr()[0]
        bar.set_postfix(
            loss=f"{step_loss / max(1, n_tokens):.4f}",
            lr=f"{lr:.2e}",
            tok_s=f"{tokens_seen / elapsed:.0f}",
        )
        bar.update(1)
        record: dict[str, Any] = {}
        if done % args.logging_steps == 0 or done == 1 or done == plan.total_steps:
            record = {
                "loss": round(window["loss"] / max(1, window["tokens"]), 6),
                "token_acc": round(window["correct"] / max(1, window["tokens"]), 6),
                "grad_norm": round(grad_norm, 6),
                "learning_rate": lr,
                "epoch": round(epoch, 4),
                "step": done,
                "elapsed": round(elapsed, 3),
                "tokens_per_s": round(tokens_seen / elapsed, 1),
                "memory_gib": round(memory_gib(device), 3),
            }
            window = {"loss": 0.0, "tokens": 0, "correct": 0}
        at_save = done % plan.save_steps == 0 or done == plan.total_steps
        if eval_batches and (done % plan.eval_steps == 0 or done == plan.total_steps):
            with autocast_context(device, weight_dtype, autocast):
                eval_loss, eval_acc = evaluate(
                    step_model, [to_device(b, device) for b in eval_batches]
                )
            record.update(
                step=done, eval_loss=round(eval_loss, 6), eval_token_acc=round(eval_acc, 6)
            )
            if at_save and (state.best_eval_loss is None or eval_loss < state.best_eval_loss):
                state.best_eval_loss, state.best_checkpoint = eval_loss, f"checkpoint-{done}"
        if record and where.main:
            append_log(run_dir, record)
        if at_save:
            last_checkpoint = save_checkpoint(
                run_dir,
                done,
                model,
                tokenizer,
                optimizer,
                scheduler,
                state,
                args_dict,
                full_model=args.train_type == "full",
            )
            if where.main:
                rotate_checkpoints(run_dir, args.save_total_limit, state.best_checkpoint)
    bar.close()
    if graphs is not None and graphs.replays:
        log.info(
            "cuda graphs: %d passes replayed from %d shapes", graphs.replays, len(graphs.graphs)
        )
    disable_fast_path(causal_lm(model))
    records = read_log(run_dir) if where.main else []
    if records:
        plot_loss(records, run_dir / "train_loss.png")
    if last_checkpoint is None:  # resumed at the very end: nothing left to do
        last_checkpoint = list_checkpoints(run_dir)[-1][1]
    return last_checkpoint
