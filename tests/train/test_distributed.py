"""Two processes under torchrun (gloo, CPU) train exactly what one process trains."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selftune.train.distributed import rank_share, torchrun_command

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
# 8 rows, 1 per micro-batch: 4 micro-batches per step (2 per rank x 2 ranks), 2 steps an epoch
FLAGS = (
    "--per_device_train_batch_size 1 --max_steps 6 --save_steps 3 --logging_steps 1 "
    "--lora_dropout 0 --learning_rate 1e-3 --seed 7 --device cpu --replay 0 --torch_dtype float32"
).split()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sft(model_dir, output, processes: int, *extra, via_env: bool = False):
    flags = [
        "sft",
        "--model",
        str(model_dir),
        "--dataset",
        str(FIXTURES / "self_cognition.json"),
        "--output_dir",
        str(output),
        *FLAGS,
        "--gradient_accumulation_steps",
        str(4 // processes),
        *map(str, extra),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if processes == 1:
        command = [sys.executable, "-m", "selftune", *flags]
    elif via_env:  # ms-swift's spelling: selftune relaunches itself under torchrun
        env.update(NPROC_PER_NODE=str(processes), MASTER_PORT=str(free_port()))
        command = [sys.executable, "-m", "selftune", *flags]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            f"--master_port={free_port()}",
            "-m",
            "selftune",
            *flags,
        ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def run_dir(output: Path) -> Path:
    (only,) = [p for p in output.iterdir() if p.is_dir()]
    return only


def losses(folder: Path) -> list[tuple[int, float]]:
    lines = (folder / "logging.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def assert_same_weights(got: Path, expected: Path) -> None:
    a, b = (
        load_file(got / "adapter_model.safetensors"),
        load_file(expected / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("one")
    sft(tiny_model_dir, output, 1)
    return run_dir(output)


def test_two_processes_train_what_one_does(tiny_model_dir, tmp_path, one_process):
    done = sft(tiny_model_dir, tmp_path, 2)
    two = run_dir(tmp_path)
    assert done.stdout.count("last checkpoint:") == 1  # rank 0 alone prints
    expected = losses(one_process)
    got = losses(two)
    assert [s for s, _ in got] == [s for s, _ in expected] == [1, 2, 3, 4, 5, 6]
    for (_, a), (_, b) in zip(got, expected):
        assert a == pytest.approx(b, rel=1e-4)
    assert expected[0][1] > expected[-1][1]  # it learned
    assert_same_weights(two / "checkpoint-6", one_process / "checkpoint-6")
    args = json.loads((two / "checkpoint-6" / "args.json").read_text())
    assert args["gradient_accumulation_steps"] == 2


def test_two_process_run_resumes_in_one(tiny_model_dir, tmp_path, one_process):
    sft(tiny_model_dir, tmp_path / "two", 2, via_env=True)
    whole = run_dir(tmp_path / "two")
    # the run as it stood when killed after its first save: checkpoint-3, log up to step 3
    killed = tmp_path / "killed" / whole.name
    shutil.copytree(whole, killed, ignore=shutil.ignore_patterns("checkpoint-6"))
    sft(tiny_model_dir, tmp_path / "killed", 1, "--resume_from_checkpoint", killed / "checkpoint-3")
    assert_same_weights(killed / "checkpoint-6", whole / "checkpoint-6")
    assert_same_weights(killed / "checkpoint-6", one_process / "checkpoint-6")
    assert [s for s, _ in losses(killed)] == [1, 2, 3, 4, 5, 6]


def test_each_rank_gets_its_share_and_equal_passes():
    group = list(range(5))
    shares = [rank_share(group, rank, 2) for rank in (0, 1)]
    assert shares == [([0, 2, 4], 0), ([1, 3, 0], 1)]  # rank 1 pads with a zero-weight stand-in
    real = [b for mine, pad in shares for b in mine[: len(mine) - pad]]
    assert sorted(real) == group


def test_nproc_per_node_relaunches_under_torchrun(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    command = torchrun_command(["sft", "--model", "m"])
    assert command[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node=2"]
    assert command[-3:] == ["sft", "--model", "m"]
    monkeypatch.setenv("LOCAL_RANK", "0")  # already a torchrun worker: no second launch
    assert torchrun_command(["sft"]) is None
