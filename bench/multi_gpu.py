"""Scaling over GPUs: selftune's training step under torchrun + FSDP2, tokens/s and peak memory.

    python bench/multi_gpu.py --config bench/configs/qwen2.5-7b-instruct.config.json --gpus 1 2 4

Launches itself under torchrun once per GPU count (counts above the GPUs present are skipped).
Random weights of the given architecture, bf16, LoRA r=8 all-linear, packed 2048-token
sequences, gradient checkpointing, the fast path; each GPU trains 2 sequences per step. Prints
one JSON object per GPU count: global tokens/s, per-GPU tokens/s, peak GiB per GPU, scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(args: argparse.Namespace) -> None:
    """One rank: build, shard, time `args.steps` optimizer steps, report from rank 0."""
    from bench.train_throughput import build, rows
    from selftune.accel.fast_path import enable_fast_path
    from selftune.accel.memory import set_checkpointing
    from selftune.data.batches import packed
    from selftune.train import distributed
    from selftune.train.loop import accumulate_gradients, to_device
    from selftune.train.loss import LossHead, label_tokens

    where = distributed.setup()
    device = f"cuda:{where.local_rank}" if torch.cuda.is_available() else "cpu"
    model = build(args.config, device)
    enable_fast_path(model.get_base_model(), device, True)
    set_checkpointing(model.get_base_model(), None)
    head = LossHead(model)
    if where.active:
        distributed.shard(head, model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    vocab = model.config.vocab_size
    per_step = 2 * where.world  # sequences per optimizer step over all ranks
    examples = rows((args.steps + 2) * per_step * 8, 256, 80, 32, min(1024, args.seq), vocab, 1)
    packs = packed(examples, args.seq)[: (args.steps + 2) * per_step]
    steps = [packs[i : i + per_step] for i in range(0, len(packs), per_step)]
    timings = []
    for index, group in enumerate(steps):
        if index == 2 and torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        mine, stand_ins = distributed.rank_share(group, where.rank, where.world)
        mine = [to_device(b, device) for b in mine]
        accumulate_gradients(head, mine, label_tokens(group), float(where.world), stand_ins)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        tokens = sum(int(b["input_ids"].numel()) for b in group)
        timings.append((time.perf_counter() - started, tokens))
    measured = timings[2:]
    seconds = sum(t for t, _ in measured)
    tokens = sum(n for _, n in measured)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    peaks = distributed.all_sum(
        [0.0] * where.rank + [peak] + [0.0] * (where.world - where.rank - 1)
    )
    if where.main:
        record = {
            "gpus": where.world,
            "tokens_per_s": round(tokens / seconds, 1),
            "tokens_per_s_per_gpu": round(tokens / seconds / where.world, 1),
            "step_s": round(seconds / len(measured), 3),
            "peak_gib_per_gpu": [round(p, 2) for p in peaks],
            "seq": args.seq,
            "sequences_per_step": per_step,
        }
        print("RESULT " + json.dumps(record), flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default=str(ROOT / "bench/configs/qwen2.5-7b-instruct.config.json")
    )
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    available = torch.cuda.device_count()
    results = []
    for n in args.gpus:
        if available and n > available:  # (no GPU at all: runs on CPU/gloo, as a check)
            print(json.dumps({"gpus": n, "skipped": f"{available} GPU(s) present"}), flush=True)
            continue
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={n}",
            f"--master_port={free_port()}",
            __file__,
            "--worker",
            "--config",
            args.config,
            "--steps",
            str(args.steps),
            "--seq",
            str(args.seq),
        ]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ})
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            print(json.dumps({"gpus": n, "error": done.stderr[-2000:]}), flush=True)
            continue
        record = json.loads(lines[-1][len("RESULT ") :])
        if results:
            record["scaling_vs_first"] = round(
                record["tokens_per_s"] / results[0]["tokens_per_s"], 2
            )
        results.append(record)
        print(json.dumps(record), flush=True)
    print(json.dumps({"summary": results, "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
