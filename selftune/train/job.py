"""A training job: the settings the loop reads, checked and resolved once from the flags into a
frozen dataclass, and what it trains."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selftune.args import SftArgs
from selftune.errors import SelftuneError, UsageError
from selftune.models.load import check_quant_bits


@dataclass(frozen=True)
class TrainSettings:
    """Every setting the plan, the loop and the checkpoints read; defaults as `selftune sft`'s
    flags after recipe.resolve_defaults (a model over 1B parameters)."""

    train_type: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("all-linear",)
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int | None = None  # None: 16 rows per optimizer step
    num_train_epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides the epochs
    learning_rate: float | None = None  # None: plan.default_learning_rate
    warmup_ratio: float = 0.0
    lr_scheduler_type: str = "cosine"
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    eval_steps: int | None = None  # None: save_steps
    save_steps: int = 500
    save_total_limit: int | None = None
    logging_steps: int = 5
    seed: int = 42
    gradient_checkpointing: bool | None = None  # None: accel.memory decides
    packing: bool = False
    cuda_graphs: bool = True
    autocast: bool = True  # bf16 autocast over float32 weights where the hardware is fast at it
    adapter_scale: float = 1.0  # share of the trained LoRA update the saved adapters apply
    resume_from_checkpoint: Path | None = None

    @property
    def full_model(self) -> bool:
        return self.train_type == "full"


@dataclass(frozen=True)
class TrainJob:
    """What `loop.train` runs: the model (not yet wrapped with adapters), its data as
    micro-batches, and where the run writes. `record` is the run's args.json, which every
    checkpoint carries so that it says how it was made."""

    settings: TrainSettings
    model: Any
    tokenizer: Any
    train_batches: Callable[[int], list[Any]]  # epoch -> that epoch's micro-batches
    micro_batches_per_epoch: int
    eval_batches: list[dict[str, Any]]
    run_dir: Path
    record: dict[str, Any]


TRAIN_TYPES = ("lora", "dora", "full", "qlora")


def check_args(args: SftArgs) -> None:
    """Everything that can be wrong with the flags alone, before any file is read."""
    if args.tuner_type:
        args.train_type = args.tuner_type
    args.train_type = args.train_type.lower()
    if args.train_type not in TRAIN_TYPES:
        raise UsageError(f"--train_type {args.train_type}: use one of {', '.join(TRAIN_TYPES)}")
    if args.train_type == "qlora" or args.quant_bits:
        args.train_type, args.quant_bits = "qlora", args.quant_bits or 4
        check_quant_bits(args.quant_bits)
    if not args.dataset:
        raise UsageError("no training data: pass --dataset (for example --dataset identity)")
    if not args.model and not args.resume_from_checkpoint:
        raise UsageError("no model given: pass --model (for example --model smollm2-135m)")
    for name in (
        "per_device_eval_batch_size",
        "save_steps",
        "logging_steps",
        "max_length",
        "lora_rank",
    ):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1")
    if args.adapter_scale is not None and args.adapter_scale != 1.0:
        if args.train_type not in ("lora", "qlora"):
            raise UsageError(f"--adapter_scale applies to LoRA, not --train_type {args.train_type}")
        if not 0 < args.adapter_scale <= 1:
            raise UsageError("--adapter_scale must be in (0, 1]")
    if not 0 <= args.split_dataset_ratio < 1:
        raise UsageError("--split_dataset_ratio must be in [0, 1)")
    if not 0 <= args.lora_dropout < 1:
        raise UsageError("--lora_dropout must be in [0, 1)")
    if args.resume_from_checkpoint and not Path(args.resume_from_checkpoint).is_dir():
        raise SelftuneError(
            f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such folder"
        )


def settings_from_args(args: SftArgs) -> TrainSettings:
    """The flags, checked and their defaults resolved, as the loop reads them."""
    resume = args.resume_from_checkpoint
    return TrainSettings(
        train_type=args.train_type,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=tuple(args.target_modules),
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        warmup_ratio=args.warmup_ratio,
        lr_scheduler_type=args.lr_scheduler_type,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        eval_steps=args.eval_steps,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps,
        seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
        packing=args.packing,
        cuda_graphs=args.cuda_graphs,
        autocast=args.torch_dtype in (None, "auto"),
        adapter_scale=args.adapter_scale or 1.0,
        resume_from_checkpoint=Path(resume) if resume else None,
    )


MIN_ROWS_SEEN = 480  # small models: at least 30 optimizer steps of 16 rows


def resolve_defaults(args: SftArgs, n_params: int, n_rows: int) -> None:
    """Fill the flags the user left unset. ms-swift's defaults (1 row per micro-batch, 16 rows per
    step, 3 epochs, lr 1e-4) are made for 7B models on a GPU. A model under 1B parameters, on a
    CPU, learns an identity faster with 16-row micro-batches (one forward instead of 16), lr 1e-3
    and as many epochs as it takes to see 480 rows: one epoch of the built-in identity set (842
    rows) or 60 of the tutorial's 8 rows (bench/README.md, "Defaults")."""

    small = n_params < SMALL_MODEL
    if args.per_device_train_batch_size is None:
        args.per_device_train_batch_size = 16 if small else 1
    if args.num_train_epochs is None:
        args.num_train_epochs = (
            float(max(1, math.ceil(MIN_ROWS_SEEN / max(1, n_rows)))) if small else 3.0
        )
    if args.learning_rate is None:
        args.learning_rate = default_learning_rate(args.train_type, n_params)


def default_learning_rate(train_type: str, n_params: int) -> float:
    """ms-swift's defaults, except that LoRA on models under 1B parameters learns at 1e-3:
    with 1e-4 a 135M model needs many more epochs to take an identity."""
    if train_type == "full":
        return 1e-5
    return 1e-3 if n_params < SMALL_MODEL else 1e-4


SMALL_MODEL = 1_000_000_000
