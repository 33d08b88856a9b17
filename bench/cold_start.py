"""The tutorial's run as a whole process: `selftune sft` from a cold start to a saved adapter.

    python bench/cold_start.py --tokenizer TOKENIZER_DIR [--config CONFIG] [--work /tmp/cold]

Writes random weights of the architecture once as safetensors (15 GB for the 7B config) with the
given tokenizer, drops the page cache where the machine allows it, then times the tutorial's
`swift sft` command line with `selftune` in its place, on the tutorial's 8 self-cognition rows.
Prints JSON: the whole process's seconds, the training loop's own seconds (from logging.jsonl),
and whether the page cache was dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "bench" / "configs" / "qwen2.5-7b-instruct.config.json"
TUTORIAL_FLAGS = [
    "--train_type", "lora", "--torch_dtype", "bfloat16", "--num_train_epochs", "10",
    "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1",
    "--learning_rate", "1e-4", "--lora_rank", "8", "--lora_alpha", "32",
    "--target_modules", "all-linear", "--gradient_accumulation_steps", "16",
    "--eval_steps", "50", "--save_steps", "50", "--save_total_limit", "2",
    "--logging_steps", "5", "--max_length", "2048", "--system", "You are a helpful assistant.",
    "--warmup_ratio", "0.05", "--dataloader_num_workers", "4",
    "--model_author", "swift", "--model_name", "swift-robot",
]  # fmt: skip
NO_READAHEAD = (
    "import selftune.models.readahead as r; r.start_readahead = lambda spec: None; "
    "from selftune.cli import console; console()"
)


def write_model(config_path: str, tokenizer_dir: str, folder: Path) -> float:
    """Random bf16 weights of the architecture, saved as an HF folder; returns seconds."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    config = AutoConfig.from_pretrained(config_path)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="4GB")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
    tmp.rename(folder)
    del model
    return time.perf_counter() - started


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


@dataclass
class Stamped:
    returncode: int
    lines: list[tuple[float, str]]  # (seconds since the start, stderr line)


def run_stamped(command: list[str], env: dict[str, str]) -> Stamped:
    """Run `command`, stamping each stderr line with the seconds since the start."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    lines = [(time.perf_counter() - started, line.rstrip("\n")) for line in proc.stderr]
    return Stamped(proc.wait(), lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG), help="architecture (random weights)")
    parser.add_argument("--tokenizer", required=True, help="a folder with a chat tokenizer")
    parser.add_argument("--dataset", default=str(ROOT / "tests/fixtures/self_cognition.json"))
    parser.add_argument("--work", default="/tmp/selftune-cold-start")
    parser.add_argument("--warm", action="store_true", help="keep the page cache")
    parser.add_argument("--profile", help="write the process's cProfile stats to this file")
    parser.add_argument(
        "--importtime",
        action="store_true",
        help="run with PYTHONPROFILEIMPORTTIME: each module's import, stamped (see --log)",
    )
    parser.add_argument("--log", help="write every stderr line, stamped, to this file")
    parser.add_argument(
        "--no_readahead",
        action="store_true",
        help="the weights are not read ahead (selftune.models.readahead) while the run imports",
    )
    parser.add_argument(
        "--pycache",
        help="keep compiled bytecode in this folder, as pip's install does in the packages' own "
        "(for a Python run with PYTHONDONTWRITEBYTECODE or read-only packages); filled by an "
        "untimed run first",
    )
    args = parser.parse_args()
    if args.profile and args.no_readahead:
        parser.error("--profile runs `-m selftune`; --no_readahead runs `-c`: pick one")
    work = Path(args.work)
    model_dir = work / "model"
    report: dict = {}
    if not model_dir.is_dir():
        work.mkdir(parents=True, exist_ok=True)
        report["write_model_s"] = round(write_model(args.config, args.tokenizer, model_dir), 1)
    report["weights_gb"] = round(
        sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 1e9, 2
    )
    output = work / "output"
    shutil.rmtree(output, ignore_errors=True)

    def sft(output_dir: Path, profile: str | None = None) -> list[str]:
        profiler = ["-m", "cProfile", "-o", profile] if profile else []
        entry = ["-m", "selftune"]
        if (
            args.no_readahead
        ):  # the run as before selftune.models.readahead, for an A/B on one machine
            entry = ["-c", NO_READAHEAD]
        command = [sys.executable, *profiler, *entry, "sft", "--model", str(model_dir)]
        return command + [
            "--dataset",
            args.dataset,
            "--output_dir",
            str(output_dir),
            *TUTORIAL_FLAGS,
        ]

    env = dict(os.environ)
    if args.pycache:  # bytecode as a pip install leaves it, where the packages' folders are not
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = args.pycache
        if not Path(args.pycache).is_dir():  # filled by one untimed run
            fill = subprocess.run(
                sft(work / "fill"), env=env, cwd=ROOT, capture_output=True, text=True
            )
            shutil.rmtree(work / "fill", ignore_errors=True)
            if fill.returncode != 0:
                sys.exit(f"the run that fills {args.pycache} failed:\n{fill.stderr[-2000:]}")
        report["pycache"] = args.pycache
    report["page_cache_dropped"] = False if args.warm else drop_page_cache()
    command = sft(output, args.profile)
    if args.importtime:
        env["PYTHONPROFILEIMPORTTIME"] = "1"
    started = time.perf_counter()
    stamped = run_stamped(command, env)
    if args.log:
        Path(args.log).write_text("".join(f"{at:7.3f} {line}\n" for at, line in stamped.lines))
    report["process_s"] = round(time.perf_counter() - started, 2)
    report["returncode"] = stamped.returncode
    if stamped.returncode != 0:
        report["stderr_tail"] = "\n".join(line for _, line in stamped.lines)[-3000:]
    logs = sorted(output.glob("*/logging.jsonl"))
    if logs:
        records = [json.loads(line) for line in logs[-1].read_text().splitlines() if line]
        steps = [r for r in records if "elapsed" in r]
        if steps:
            report["train_loop_s"] = steps[-1]["elapsed"]
            report["steps"] = steps[-1]["step"]
            report["peak_gib"] = steps[-1].get("memory_gib")
    report["checkpoints"] = [p.name for p in output.glob("*/checkpoint-*")]
    said = ("fast path", "cuda graphs", "memory:")
    report["fast_path_log"] = [line for _, line in stamped.lines if any(s in line for s in said)]
    # where the seconds go: each of selftune's own log lines, stamped from the process start
    report["timeline"] = [
        f"{at:6.2f}s {line[:120]}" for at, line in stamped.lines if line.startswith("[selftune]")
    ]
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
