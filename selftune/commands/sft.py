"""`selftune sft`: check everything, read the data, then load the model and train."""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import platform
from pathlib import Path
from typing import Any

from selftune.args import SftArgs
from selftune.errors import SelftuneError, UsageError
from selftune.models import check_quant_bits

ARGS = SftArgs
log = logging.getLogger(__name__)
TRAIN_TYPES = ("lora", "dora", "full", "qlora")
# General rows the base answers itself, mixed into identity training: keeps its general answers
# (README, "Defaults"); the base's answers are cached per model, so only the first run pays.
DEFAULT_REPLAY = 128
# built-in identity, embedded model: retention 85% -> 91% at 0.7, identity 98-100% (README)
IDENTITY_ADAPTER_SCALE = 0.7
# what the steps after the model load import, imported while its weights are read (preload):
# with the plot drawn without pyplot, the tutorial's cold start on an H200 took 2.0-3.7 s less
LATER_IMPORTS = (
    "torch.distributed.checkpoint.state_dict",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
)


def later_imports(args: SftArgs, folder: Path) -> tuple[Any, ...]:
    """LATER_IMPORTS, with peft where adapters train; where a GPU does, Liger, and last the
    compiles of the Triton kernels (kernels.precompile: seconds on a machine's first run)."""
    from selftune.models import pick_device, pick_dtype

    full = args.train_type == "full"
    device = pick_device(args.device)
    if not device.startswith("cuda"):
        return (() if full else ("peft",)) + LATER_IMPORTS
    names = (() if full else ("peft",)) + ("liger_kernel.transformers.monkey_patch",)
    if full:  # the head trains: no cross-entropy kernel
        return names + LATER_IMPORTS
    from selftune.distributed import ranks
    from selftune.kernels.precompile import precompile

    # the dropout kernels where grouped LoRA drops out (one process: fast_path)
    grouped = args.train_type == "lora" and args.lora_dropout > 0 and ranks().world == 1
    dtype = pick_dtype(args.torch_dtype, device)
    compile_kernels = functools.partial(precompile, folder, args.lora_rank * grouped, dtype, device)
    return names + LATER_IMPORTS + (compile_kernels,)


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


def run(args: SftArgs) -> int:
    from selftune.distributed import ranks

    last = train_run(args)
    if ranks().main:
        print(f"last checkpoint: {last}")
    return 0


def join_processes(args: SftArgs) -> None:
    """Under torchrun: join the group, one GPU per process, and only rank 0 says anything."""
    from selftune.distributed import setup

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
    that lives as long as the run, and full passes over it found next to nothing (0.8 s before
    the first step of a tiny model's run on a 2-core CPU). Training then runs with that heap
    frozen, so that its collections scan only what training makes."""
    enabled = gc.isenabled()
    gc.disable()
    frozen = False
    try:
        job = prepare(args)
        frozen = gc.get_freeze_count() == 0  # a caller's own frozen heap is left as it is
        if frozen:
            gc.freeze()  # zeroes the count too: turning the collector on starts no pass
    finally:
        if enabled:
            gc.enable()
    from selftune.train import train

    try:
        return train(*job)
    finally:
        if frozen:
            gc.unfreeze()


def prepare(args: SftArgs) -> tuple[Any, ...]:
    """Everything before the first step: flags, data, model, batches, run folder; returns
    `train.train`'s arguments."""
    check_args(args)
    join_processes(args)
    resume = Path(args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    if resume is not None and not args.model:
        from selftune.models import checkpoint_args

        args.model = checkpoint_args(resume).get("model")

    from selftune.data.encode import encode_all
    from selftune.data.identity import model_default_system, parse_identity_values
    from selftune.data.mix import check_datasets, load_mixture, split, uses_identity
    from selftune.models import load_tokenizer, resolve_model
    from selftune.readahead import start_readahead

    identity = None
    if args.replay is None:
        args.replay = DEFAULT_REPLAY if uses_identity(args.dataset) else 0
    if args.adapter_scale is None:
        identity_lora = uses_identity(args.dataset) and args.train_type in ("lora", "qlora")
        args.adapter_scale = IDENTITY_ADAPTER_SCALE if identity_lora else 1.0
    if uses_identity(args.dataset + args.val_dataset):
        identity = parse_identity_values(args.model_name, args.model_author)
    # every row is read and checked before anything of the model is touched
    loaded = check_datasets(args.dataset, identity)
    val_loaded = check_datasets(args.val_dataset, identity) if args.val_dataset else {}
    start_readahead(args.model)  # the weights read while torch and transformers import
    folder = resolve_model(args.model)
    tokenizer = load_tokenizer(folder)
    default_system = model_default_system(tokenizer)
    conversations = load_mixture(
        args.dataset,
        args.seed,
        identity,
        args.system,
        default_system,
        args.identity_system_variants,
        loaded=loaded,
    )
    if args.val_dataset:
        val = load_mixture(
            args.val_dataset,
            args.seed,
            identity,
            args.system,
            default_system,
            False,
            loaded=val_loaded,
        )
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

    from selftune.batches import make_batches, step_pack_tokens
    from selftune.checkpoint import new_run_dir, write_json_atomic
    from selftune.models import load_model
    from selftune.train import count_parameters, resolve_defaults, seed_everything

    seed_everything(args.seed)
    model, tokenizer, folder = load_model(
        str(folder),
        args.torch_dtype,
        args.device,
        args.quant_bits,
        tokenizer,
        later_imports(args, folder),
    )
    device = str(next(model.parameters()).device)
    if args.replay > 0:
        from selftune.distill import attach_teacher
        from selftune.distributed import barrier, ranks
        from selftune.replay import replay_conversations

        if not ranks().main:
            barrier()  # rank 0 answers and caches first; the others read its cache
        replayed = replay_conversations(model, tokenizer, folder, args.replay, args.seed)
        if ranks().main:
            barrier()
        replay_examples, _ = encode_all(tokenizer, replayed, args.max_length, args.system)
        attach_teacher(model, replay_examples, args.replay_top_k)
        train_examples = train_examples + replay_examples
        log.info(
            "replay: %d general conversations answered by the base model%s",
            len(replayed),
            f", trained toward its top-{args.replay_top_k} probabilities"
            if args.replay_top_k
            else "",
        )
    resolve_defaults(args, count_parameters(model), len(train_examples))
    # On a GPU each optimizer step's rows are packed into as few forward passes as fit
    # (batches.StepRows): the same rows and loss as unpacked training, far less idle time.
    from selftune.distributed import broadcast, ranks
    from selftune.fast_path import packs_safely

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
    eval_batches = (
        make_batches(
            val_examples,
            args.per_device_eval_batch_size,
            False,
            args.max_length,
            tokenizer.pad_token_id,
        )[0](0)
        if val_examples
        else []
    )

    if resume:
        run_dir = resume.parent
    else:  # rank 0 makes the folder; every rank writes into it
        run_dir = Path(broadcast(str(new_run_dir(Path(args.output_dir))) if ranks().main else None))
    args_dict: dict[str, Any] = {
        **dataclasses.asdict(args),
        "model_folder": str(folder),
        "default_system": default_system,
        "versions": versions(),
    }
    if ranks().main:
        write_json_atomic(run_dir / "args.json", args_dict)
    log.info("run folder: %s", run_dir)
    return model, tokenizer, micro_batches, per_epoch, eval_batches, args, run_dir, args_dict
