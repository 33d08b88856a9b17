"""The sft recipe: checked flags, data, model and batches turned into a typed TrainJob, then run.

Heavy modules (torch and what imports it) are imported where first needed, so that the model's
weights are already being read (models.readahead) while they import.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selftune.args import SftArgs
from selftune.errors import SelftuneError
from selftune.train.job import TrainJob, check_args, resolve_defaults, settings_from_args

log = logging.getLogger(__name__)


# General rows the base answers itself, mixed into identity training: keeps its general answers;
# the base's answers are cached per model, so only the first run pays (bench/README.md).
DEFAULT_REPLAY = 128


# the built-in identity's saved adapters apply this share of the update: less forgetting for a
# little identity strength (bench/README.md, "Defaults")
IDENTITY_ADAPTER_SCALE = 0.7


# what the steps after the model load import, imported while its weights are read (preload)
LATER_IMPORTS = (
    "torch.distributed.checkpoint.state_dict",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
)


def later_imports(args: SftArgs, folder: Path) -> tuple[Any, ...]:
    """LATER_IMPORTS, with peft where adapters train; where a GPU does, Liger, and last the
    compiles of the Triton kernels (kernels.precompile: seconds on a machine's first run)."""
    from selftune.models.load import pick_device, pick_dtype

    full = args.train_type == "full"
    device = pick_device(args.device)
    if not device.startswith("cuda"):
        return (() if full else ("peft",)) + LATER_IMPORTS
    names = (() if full else ("peft",)) + ("liger_kernel.transformers.monkey_patch",)
    if full:  # the head trains: no cross-entropy kernel
        return names + LATER_IMPORTS
    from selftune.accel.kernels.precompile import precompile
    from selftune.train.distributed import ranks

    # the dropout kernels where grouped LoRA drops out (one process: fast_path)
    grouped = args.train_type == "lora" and args.lora_dropout > 0 and ranks().world == 1
    dtype = pick_dtype(args.torch_dtype, device)
    compile_kernels = functools.partial(precompile, folder, args.lora_rank * grouped, dtype, device)
    return names + LATER_IMPORTS + (compile_kernels,)


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    from selftune import __version__

    return {
        "selftune": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def join_processes(args: SftArgs) -> None:
    """Under torchrun: join the group, one GPU per process, and only rank 0 says anything."""
    from selftune.train.distributed import setup

    where = setup()
    if not where.active:
        return
    if not where.main:
        logging.getLogger().setLevel(logging.WARNING)
    if args.device is None or args.device == "cuda":
        import torch

        args.device = f"cuda:{where.local_rank}" if torch.cuda.is_available() else "cpu"


def train_run(args: SftArgs) -> Path:
    """The whole `sft` job; returns the last checkpoint.

    Start-up (imports, data, model) runs with the cyclic garbage collector off: it builds a heap
    that lives as long as the run, and full passes over it find next to nothing. Training then
    runs with that heap frozen, so that its collections scan only what training makes."""
    enabled = gc.isenabled()
    gc.disable()
    frozen = False
    try:
        job = build_job(args)
        frozen = gc.get_freeze_count() == 0  # a caller's own frozen heap is left as it is
        if frozen:
            gc.freeze()  # zeroes the count too: turning the collector on starts no pass
    finally:
        if enabled:
            gc.enable()
    from selftune.train import loop

    try:
        return loop.train(job)
    finally:
        if frozen:
            gc.unfreeze()


@dataclass
class Data:
    """The run's rows, encoded, and what reading them needed of the model."""

    train: list[Any]  # data.encode.Example
    val: list[Any]
    folder: Path  # the resolved model folder
    tokenizer: Any
    default_system: str | None
    counts: dict[str, int]  # rows read, kept, truncated and dropped (args.json's "data")


def build_job(args: SftArgs) -> TrainJob:
    """Everything before the first step: flags, data, model, batches, run folder."""
    check_args(args)
    join_processes(args)
    resume = Path(args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    if resume is not None and not args.model:
        from selftune.models.load import checkpoint_args

        args.model = checkpoint_args(resume).get("model")
    data = read_data(args)
    from selftune.models.load import load_model
    from selftune.train.plan import count_parameters, seed_everything

    seed_everything(args.seed)
    model, tokenizer, folder = load_model(
        str(data.folder),
        args.torch_dtype,
        args.device,
        args.quant_bits,
        data.tokenizer,
        later_imports(args, data.folder),
    )
    train_examples = data.train + replay_examples(args, model, tokenizer, folder)
    resolve_defaults(args, count_parameters(model), len(train_examples))
    micro_batches, per_epoch, eval_batches = batches(args, model, tokenizer, train_examples, data)
    run_dir, record = start_run(args, resume, folder, data)
    return TrainJob(
        settings=settings_from_args(args),
        model=model,
        tokenizer=tokenizer,
        train_batches=micro_batches,
        micro_batches_per_epoch=per_epoch,
        eval_batches=eval_batches,
        run_dir=run_dir,
        record=record,
    )


def read_data(args: SftArgs) -> Data:
    """Every row read and checked, then encoded with the model's tokenizer, before anything
    of the model's weights is loaded."""
    from selftune.data.encode import encode_all
    from selftune.data.identity import model_default_system, parse_identity_values
    from selftune.data.mix import check_datasets, load_mixture, split, uses_identity
    from selftune.models.load import load_tokenizer
    from selftune.models.readahead import start_readahead
    from selftune.models.resolve import resolve_model

    identity = None
    if args.replay is None:
        args.replay = DEFAULT_REPLAY if uses_identity(args.dataset) else 0
    if args.adapter_scale is None:
        identity_lora = uses_identity(args.dataset) and args.train_type in ("lora", "qlora")
        args.adapter_scale = IDENTITY_ADAPTER_SCALE if identity_lora else 1.0
    if uses_identity(args.dataset + args.val_dataset):
        identity = parse_identity_values(args.model_name, args.model_author)
    loaded = check_datasets(args.dataset, identity, args.coerce_text)
    val_loaded = (
        check_datasets(args.val_dataset, identity, args.coerce_text) if args.val_dataset else {}
    )
    start_readahead(args.model)  # the weights read while torch and transformers import
    folder = resolve_model(args.model)
    tokenizer = load_tokenizer(folder)
    default_system = model_default_system(tokenizer)
    mixture = functools.partial(
        load_mixture,
        seed=args.seed,
        identity=identity,
        system=args.system,
        default_system=default_system,
    )
    conversations = mixture(args.dataset, variants=args.identity_system_variants, loaded=loaded)
    if args.val_dataset:
        val = mixture(args.val_dataset, variants=False, loaded=val_loaded)
        train_rows = conversations
    else:
        train_rows, val = split(conversations, args.split_dataset_ratio, args.seed)
    train_examples, stats = encode_all(tokenizer, train_rows, args.max_length, args.system)
    val_examples, _ = (
        encode_all(tokenizer, val, args.max_length, args.system) if val else ([], None)
    )
    if not train_examples:
        raise SelftuneError("no training rows left after tokenisation (all truncated away?)")
    log.info(
        "data: %d training rows, %d eval rows; %s", len(train_examples), len(val_examples), stats
    )
    if stats.named:
        more = stats.truncated + stats.dropped - len(stats.named)
        log.warning(
            "rows longer than --max_length %d: %s%s",
            args.max_length,
            "; ".join(stats.named),
            f"; and {more} more" if more > 0 else "",
        )
    counts = {
        "rows": stats.rows,
        "kept": stats.kept,
        "truncated": stats.truncated,
        "dropped": stats.dropped,
    }
    return Data(train_examples, val_examples, folder, tokenizer, default_system, counts)


def replay_examples(args: SftArgs, model: Any, tokenizer: Any, folder: Path) -> list[Any]:
    """--replay general conversations answered by the base model, with its top-k
    probabilities attached as soft targets (train.distill)."""
    if args.replay <= 0:
        return []
    from selftune.data.encode import encode_all
    from selftune.train.distill import attach_teacher
    from selftune.train.distributed import barrier, ranks
    from selftune.train.replay import replay_conversations

    if not ranks().main:
        barrier()  # rank 0 answers and caches first; the others read its cache
    replayed = replay_conversations(model, tokenizer, folder, args.replay, args.seed)
    if ranks().main:
        barrier()
    examples, _ = encode_all(tokenizer, replayed, args.max_length, args.system)
    attach_teacher(model, examples, args.replay_top_k)
    log.info(
        "replay: %d general conversations answered by the base model%s",
        len(replayed),
        f", trained toward its top-{args.replay_top_k} probabilities" if args.replay_top_k else "",
    )
    return examples


def batches(
    args: SftArgs, model: Any, tokenizer: Any, train_examples: list[Any], data: Data
) -> tuple[Any, int, list[Any]]:
    """(epoch -> micro-batches, micro-batches an epoch, eval batches). On a GPU each optimizer
    step's rows are packed into as few forward passes as fit (data.batches.StepRows): the same
    rows and loss as unpacked training, far less idle time."""
    from selftune.accel.fast_path import packs_safely
    from selftune.data.batches import make_batches, step_pack_tokens
    from selftune.train.distributed import ranks

    device = str(next(model.parameters()).device)
    pack_tokens = 0  # (several processes keep unpacked steps: each rank must run alike)
    if (
        device.startswith("cuda")
        and not args.packing
        and packs_safely(model)
        and ranks().world == 1
    ):
        pack_tokens = step_pack_tokens(
            args.max_length,
            args.per_device_train_batch_size,
            args.gradient_checkpointing is not False,
        )
    micro_batches, per_epoch = make_batches(
        train_examples,
        args.per_device_train_batch_size,
        args.packing,
        args.max_length,
        tokenizer.pad_token_id,
        pack_tokens,
    )
    if pack_tokens:
        log.info(
            "fast path: each optimizer step's rows packed into sequences of %d tokens", pack_tokens
        )
    eval_batches = []
    if data.val:
        eval_batches = make_batches(
            data.val,
            args.per_device_eval_batch_size,
            False,
            args.max_length,
            tokenizer.pad_token_id,
        )[0](0)
    return micro_batches, per_epoch, eval_batches


def start_run(
    args: SftArgs, resume: Path | None, folder: Path, data: Data
) -> tuple[Path, dict[str, Any]]:
    """The run folder (the resumed checkpoint's, or a new vN-...) and its args.json."""
    from selftune.atomic import remove_stale_temps, write_json_atomic
    from selftune.train.checkpoint import new_run_dir
    from selftune.train.distributed import broadcast, ranks

    if resume:
        run_dir = resume.parent
    else:  # rank 0 makes the folder; every rank writes into it
        run_dir = Path(broadcast(str(new_run_dir(Path(args.output_dir))) if ranks().main else None))
    record: dict[str, Any] = {
        **dataclasses.asdict(args),
        "model_folder": str(folder),
        "default_system": data.default_system,
        "data": data.counts,
        "versions": versions(),
    }
    if ranks().main:
        gone = remove_stale_temps(run_dir)
        if gone:
            log.info(
                "removed %d leftover temporary file(s) of runs that are no longer alive: %s",
                len(gone),
                ", ".join(p.name for p in gone),
            )
        write_json_atomic(run_dir / "args.json", record)
    log.info("run folder: %s", run_dir)
    return run_dir, record
