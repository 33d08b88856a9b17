"""Run folders, atomic checkpoint saves, rotation, and the state a resume needs.

A checkpoint is written under a temporary name and renamed when complete, so a crash or a full
disk never leaves a broken checkpoint where a good one was. Our own state files are safetensors
and JSON (no pickle).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selftune.atomic import atomic_folder, write_json_atomic
from selftune.errors import SelftuneError
from selftune.models.load import causal_lm

STATE_FILE = "training_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng_state.safetensors"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def new_run_dir(output_dir: Path) -> Path:
    """OUTPUT_DIR/vN-YYYYMMDD-HHMMSS, N one more than the highest existing version."""
    output_dir.mkdir(parents=True, exist_ok=True)
    versions = [
        int(m.group(1))
        for child in output_dir.iterdir()
        if (m := re.match(r"^v(\d+)-", child.name)) and child.is_dir()
    ]
    version = max(versions, default=-1) + 1
    run_dir = output_dir / f"v{version}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir()
    return run_dir


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for child in run_dir.iterdir() if run_dir.is_dir() else []:
        match = CHECKPOINT_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def optimizer_tensors(model: Any, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """AdamW state keyed by parameter name, whole (gathered from every rank under FSDP2), as
    named tensors plus the JSON-able rest. Names, not positions: a run saved by N processes
    resumes in M."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_optimizer_state_dict(model, optimizer, options=options)
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": state.get("param_groups", []), "state": {}}
    for name, entry in state.get("state", {}).items():
        plain["state"][name] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().contiguous().cpu()
            else:
                plain["state"][name][key] = value
    return tensors, plain


KERNEL_CHOICES = ("fused", "foreach")  # optimizer options that follow the device, not the run


def load_optimizer(
    model: Any, optimizer: torch.optim.Optimizer, tensors: dict, plain: dict
) -> None:
    """Every rank reads the whole state; FSDP2 keeps its own shard. The kernel choice (fused
    or not) stays the one made for this run's device: torch would take the saved one, so a run
    saved on a CPU would resume unfused on a GPU and the reverse fused on a CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state: dict[str, dict[str, Any]] = {name: dict(rest) for name, rest in plain["state"].items()}
    for key, value in tensors.items():
        name, field = key.rsplit("/", 1)
        state.setdefault(name, {})[field] = value
    groups = [
        {**saved, **{k: live[k] for k in KERNEL_CHOICES if k in live}}
        for saved, live in zip(plain["param_groups"], optimizer.param_groups, strict=False)
    ]
    set_optimizer_state_dict(
        model,
        optimizer,
        {"state": state, "param_groups": groups},
        options=StateDictOptions(full_state_dict=True),
    )


def gathered_weights(model: Any, full_model: bool) -> dict[str, torch.Tensor] | None:
    """Under FSDP2, the trained weights gathered whole onto rank 0 (None elsewhere); None when
    not distributed, where save_pretrained reads the model itself."""
    from selftune.train.distributed import ranks

    if not ranks().active:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=not full_model
    )
    weights = get_model_state_dict(model, options=options)
    return weights if ranks().main else None


def rng_tensors() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = rng
    np_state = np.random.get_state()
    tensors["numpy.keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    plain = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, plain


def restore_rng(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, values, gauss = plain["python"]
    random.setstate((version, tuple(values), gauss))
    kind, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state(
        (kind, tensors["numpy.keys"].numpy().astype(np.uint32), pos, has_gauss, cached)
    )


@dataclass
class TrainingState:
    """What a resume needs besides weights and optimizer: where we were and how it went."""

    step: int
    epoch: float
    micro_batches_done: int
    best_eval_loss: float | None = None
    best_checkpoint: str | None = None
    # the loss window since the last logged step (runlog.LossWindow), so that a resumed run
    # logs the same means as an uninterrupted one
    window: dict[str, float] | None = None


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainingState,
    record: dict[str, Any],
    full_model: bool,
    adapter_scale: float = 1.0,
) -> Path:
    """Write checkpoint-STEP atomically: temp folder, then rename over any older one. Under
    FSDP2 every rank gathers; rank 0 alone writes. `record`: the run's args.json, copied in;
    `adapter_scale`: the share of the trained update the saved adapter applies."""
    from selftune.train.distributed import barrier, ranks

    final = run_dir / f"checkpoint-{step}"
    weights = gathered_weights(model, full_model)
    opt_tensors, opt_plain = optimizer_tensors(model, optimizer)
    if not ranks().main:
        barrier()
        return final
    try:  # a failed save leaves the last good one alone
        with atomic_folder(final) as tmp:
            if weights is None:
                model.save_pretrained(tmp, safe_serialization=True)
            else:
                model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
            if not full_model:
                scale_saved_adapter(tmp, adapter_scale)
            write_checkpoint_files(
                tmp, tokenizer, opt_tensors, opt_plain, scheduler, state, record, full_model
            )
    finally:
        barrier()
    return final


def scale_saved_adapter(folder: Path, scale: float) -> None:
    """Have the saved adapter apply `scale` x its trained update: PEFT scales LoRA by
    alpha / r, so alpha carries it, and every loader (eval, infer, serve, export, PEFT itself)
    sees it. Resuming reads the weights alone and trains on at the run's own alpha."""
    if scale == 1.0:
        return
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config["lora_alpha"] = config["lora_alpha"] * scale
    config["alpha_pattern"] = {k: v * scale for k, v in (config.get("alpha_pattern") or {}).items()}
    path.write_text(json.dumps(config, indent=2))


def write_checkpoint_files(
    tmp: Path,
    tokenizer: Any,
    opt_tensors: dict[str, torch.Tensor],
    opt_plain: dict,
    scheduler: Any,
    state: TrainingState,
    record: dict[str, Any],
    full_model: bool,
) -> None:
    from safetensors.torch import save_file

    if full_model:
        tokenizer.save_pretrained(tmp)
    save_file(opt_tensors, str(tmp / OPTIMIZER_FILE))
    rng, rng_plain = rng_tensors()
    save_file(rng, str(tmp / RNG_FILE))
    write_json_atomic(
        tmp / STATE_FILE,
        {
            **state.__dict__,
            "optimizer": opt_plain,
            "scheduler": scheduler.state_dict(),
            "rng": rng_plain,
        },
    )
    write_json_atomic(tmp / "args.json", record)


def load_training_state(
    checkpoint: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any
) -> TrainingState:
    """Restore optimizer, scheduler and RNG from a checkpoint; return its position."""
    from safetensors.torch import load_file

    state_path = checkpoint / STATE_FILE
    if not state_path.is_file():
        raise SelftuneError(f"--resume_from_checkpoint {checkpoint}: no {STATE_FILE} in it")
    saved = json.loads(state_path.read_text(encoding="utf-8"))
    load_optimizer(
        model, optimizer, load_file(str(checkpoint / OPTIMIZER_FILE)), saved["optimizer"]
    )
    scheduler.load_state_dict(saved["scheduler"])
    restore_rng(load_file(str(checkpoint / RNG_FILE)), saved["rng"])
    fields = TrainingState.__dataclass_fields__
    return TrainingState(**{k: v for k, v in saved.items() if k in fields})


def rotate_checkpoints(run_dir: Path, limit: int | None, best: str | None) -> None:
    """Keep at most `limit` checkpoints: the last, the best by eval loss, then the newest."""
    if not limit or limit < 1:
        return
    found = list_checkpoints(run_dir)
    keep = [found[-1][1]] if found else []
    if best and limit > 1 and (run_dir / best).exists() and run_dir / best not in keep:
        keep.append(run_dir / best)
    for _, path in reversed(found):
        if len(keep) >= limit:
            break
        if path not in keep:
            keep.append(path)
    for _, path in found:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


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
