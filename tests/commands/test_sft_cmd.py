"""`selftune sft` as a user runs it, on a tiny random model with the real SmolLM2 tokenizer."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import run_selftune as selftune

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TUTORIAL_FLAGS = (
    "--train_type lora --torch_dtype float32 --num_train_epochs 10 "
    "--per_device_train_batch_size 1 --per_device_eval_batch_size 1 --learning_rate 1e-4 "
    "--lora_rank 8 --lora_alpha 32 --target_modules all-linear --gradient_accumulation_steps 16 "
    "--eval_steps 50 --save_steps 50 --save_total_limit 2 --logging_steps 5 --max_length 2048 "
    "--warmup_ratio 0.05 --dataloader_num_workers 4 --model_author swift --model_name swift-robot"
).split()


def only_run_dir(output: Path) -> Path:
    (run_dir,) = [p for p in output.iterdir() if p.is_dir()]
    return run_dir


def test_tutorial_command_writes_the_layout(tiny_model_dir, tmp_path):
    output = tmp_path / "output"
    done = selftune(
        "sft",
        "--model",
        tiny_model_dir,
        "--dataset",
        FIXTURES / "self_cognition.json",
        *TUTORIAL_FLAGS,
        "--output_dir",
        output,
        "--system",
        "You are a helpful assistant.",
    )
    assert done.returncode == 0, done.stderr
    run_dir = only_run_dir(output)
    assert run_dir.name.startswith("v0-") and len(run_dir.name.split("-")) == 3
    args = json.loads((run_dir / "args.json").read_text())
    assert args["model"] == str(tiny_model_dir) and args["system"] == "You are a helpful assistant."
    assert args["versions"]["torch"] == torch.__version__
    records = [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 5, 10]  # 8 rows x 10 epochs / 16 per step
    for key in (
        "loss",
        "grad_norm",
        "learning_rate",
        "token_acc",
        "epoch",
        "elapsed",
        "memory_gib",
    ):
        assert key in records[-1]
    assert (run_dir / "train_loss.png").stat().st_size > 1000
    checkpoint = run_dir / "checkpoint-10"
    for name in ("adapter_config.json", "adapter_model.safetensors", "args.json"):
        assert (checkpoint / name).is_file()
    assert [p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint")] == [
        "checkpoint-10"
    ]

    from selftune.args import InferArgs
    from selftune.models.load import load_for_inference

    loaded = load_for_inference(InferArgs(adapters=[str(checkpoint)], device="cpu"))
    assert loaded.system == "You are a helpful assistant."
    assert loaded.folder == tiny_model_dir
    chat = selftune("infer", "--adapters", checkpoint, "--max_new_tokens", "5", stdin="你是谁?\n")
    assert chat.returncode == 0, chat.stderr


def test_bad_rows_stop_before_the_model_loads(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(['{"query": "q", "response": "r"}'] * 6 + ["{broken"]) + "\n")
    done = selftune(
        "sft", "--model", "/no/such/model", "--dataset", data, "--output_dir", tmp_path / "out"
    )
    assert done.returncode != 0
    assert "bad.jsonl" in done.stderr and "line 7" in done.stderr
    assert not (tmp_path / "out").exists()


def test_identity_needs_name_and_author(tmp_path):
    done = selftune(
        "sft",
        "--model",
        "/no/such/model",
        "--dataset",
        "identity",
        "--output_dir",
        tmp_path / "out",
    )
    assert done.returncode != 0 and "--model_name" in done.stderr
    assert "Traceback" not in done.stderr


RESUME_FLAGS = (
    "--gradient_accumulation_steps 1 --max_steps 60 --save_steps 20 --logging_steps 1 "
    "--lora_dropout 0.1 --learning_rate 1e-3 --seed 7"
).split()


def train_cmd(model_dir, output, *extra):
    return [
        sys.executable,
        "-m",
        "selftune",
        "sft",
        "--model",
        str(model_dir),
        "--dataset",
        str(FIXTURES / "self_cognition.json"),
        "--output_dir",
        str(output),
        *RESUME_FLAGS,
        *map(str, extra),
    ]


def last_logged_step(run_dir: Path) -> int:
    path = run_dir / "logging.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


@pytest.mark.slow  # three runs of 60 steps, one killed mid-way
def test_killed_run_resumes_to_the_same_weights(tiny_model_dir, tmp_path):
    whole = subprocess.run(
        train_cmd(tiny_model_dir, tmp_path / "whole"), capture_output=True, text=True, timeout=900
    )
    assert whole.returncode == 0, whole.stderr
    expected = load_file(
        only_run_dir(tmp_path / "whole") / "checkpoint-60" / "adapter_model.safetensors"
    )

    output = tmp_path / "killed"
    process = subprocess.Popen(
        train_cmd(tiny_model_dir, output),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ},
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        runs = [p for p in output.iterdir()] if output.exists() else []
        if runs and (runs[0] / "checkpoint-20").exists() and last_logged_step(runs[0]) >= 25:
            break
        time.sleep(0.005)  # polling interval, not a wait for an event
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    run_dir = only_run_dir(output)
    saved = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint"))
    assert "checkpoint-60" not in saved
    latest = max(saved, key=lambda name: int(name.split("-")[1]))
    resumed = subprocess.run(
        train_cmd(tiny_model_dir, output, "--resume_from_checkpoint", run_dir / latest),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stderr
    got = load_file(run_dir / "checkpoint-60" / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    steps = [
        json.loads(line)["step"] for line in (run_dir / "logging.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 60


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only message")
@pytest.mark.parametrize("flags", [["--train_type", "qlora"], ["--quant_bits", "4"]])
def test_qlora_on_cpu_says_it_needs_a_gpu(tmp_path, flags):
    done = selftune(
        "sft",
        "--model",
        "/no/such/model",
        "--dataset",
        "identity",
        *flags,
        "--output_dir",
        tmp_path / "out",
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA GPU" in lines[0]  # before the model is looked for
    assert not (tmp_path / "out").exists()


def test_adapter_scale_saves_a_share_of_the_trained_update(tiny_model_dir, tmp_path):
    """Training is the same; the saved adapter applies `scale` x the update, through alpha."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    checkpoints = {}
    for scale in ("1", "0.5"):
        done = selftune(
            "sft", "--model", tiny_model_dir, "--dataset", FIXTURES / "self_cognition.json",
            "--model_name", "星河", "--model_author", "北辰", "--max_steps", "2",
            "--torch_dtype", "float32", "--adapter_scale", scale, "--output_dir", tmp_path / scale,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        checkpoints[scale] = only_run_dir(tmp_path / scale) / "checkpoint-2"
    weights = {s: load_file(str(c / "adapter_model.safetensors")) for s, c in checkpoints.items()}
    for name, tensor in weights["1"].items():
        torch.testing.assert_close(weights["0.5"][name], tensor)
    configs = {
        s: json.loads((c / "adapter_config.json").read_text()) for s, c in checkpoints.items()
    }
    assert configs["0.5"]["lora_alpha"] == configs["1"]["lora_alpha"] / 2
    assert json.loads((checkpoints["0.5"] / "args.json").read_text())["adapter_scale"] == 0.5
    scalings = []
    for scale in ("1", "0.5"):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        tuned = PeftModel.from_pretrained(base, checkpoints[scale])
        layer = tuned.base_model.model.model.layers[0].self_attn.q_proj
        scalings.append(layer.scaling["default"])
    assert scalings[1] == pytest.approx(scalings[0] / 2)


def test_adapter_scale_is_for_lora(tmp_path):
    done = selftune(
        "sft", "--model", "smollm2-135m", "--dataset", "identity", "--train_type", "full",
        "--adapter_scale", "0.5", "--output_dir", tmp_path,
    )  # fmt: skip
    assert done.returncode != 0
    assert "--adapter_scale applies to LoRA" in done.stderr


@pytest.mark.parametrize("rate", ["1", "-0.1"])
def test_lora_dropout_must_leave_something(tmp_path, rate):
    done = selftune(
        "sft", "--model", "smollm2-135m", "--dataset", "identity", "--lora_dropout", rate,
        "--output_dir", tmp_path,
    )  # fmt: skip
    assert done.returncode != 0
    assert "--lora_dropout must be in [0, 1)" in done.stderr
    assert not any(tmp_path.iterdir())  # stopped before anything was written


def test_a_loss_that_turns_nan_stops_the_run_and_saves_nothing(tmp_path, smol_tokenizer):
    from support import build_tiny_llama

    folder = tmp_path / "nan-model"
    model = build_tiny_llama(len(smol_tokenizer))
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    output = tmp_path / "output"
    done = selftune(
        "sft",
        "--model",
        folder,
        "--dataset",
        FIXTURES / "self_cognition.json",
        *TUTORIAL_FLAGS,
        "--save_steps",
        "1",
        "--output_dir",
        output,
    )
    assert done.returncode != 0
    assert "the loss became nan at step 1" in done.stderr
    assert len(done.stderr.strip().splitlines()[-1]) < 300  # one line, no trace
    assert not list(output.glob("*/checkpoint-*"))


@pytest.fixture
def recorded_run(monkeypatch):
    """`train_run` with preparation and training replaced by recorders of the collector's state;
    preparation builds a heap of 200,000 objects, as start-up does."""
    import gc

    import selftune.train.loop
    from selftune.train import recipe

    seen: dict = {}
    collections: list[int] = []

    def count(phase, info):
        if phase == "start":
            collections.append(info["generation"])

    def prepare(args):
        seen["prepare"] = gc.isenabled()
        if args == "bad":
            raise recipe.SelftuneError("bad rows")
        heap = [[] for _ in range(200_000)]
        collections.clear()
        return (args, heap)

    def train(job):
        seen["train"] = (gc.isenabled(), gc.get_freeze_count() > 0, job[0], len(collections))
        if job[0] == "fails":
            raise RuntimeError("out of memory")
        return Path("checkpoint-10")

    monkeypatch.setattr(recipe, "build_job", prepare)
    monkeypatch.setattr(selftune.train.loop, "train", train)
    gc.callbacks.append(count)
    yield recipe.train_run, seen
    gc.callbacks.remove(count)


def test_start_up_runs_without_collections_training_on_a_frozen_heap(recorded_run):
    import gc

    train_run, seen = recorded_run
    assert train_run("args") == Path("checkpoint-10")
    # no pass over the start-up heap between the two either: it was frozen before gc came back
    assert seen == {"prepare": False, "train": (True, True, "args", 0)}
    assert gc.isenabled() and gc.get_freeze_count() == 0  # as before, after the run


def test_a_failed_start_up_gives_the_collector_back(recorded_run):
    import gc

    from selftune.errors import SelftuneError

    train_run, seen = recorded_run
    with pytest.raises(SelftuneError, match="bad rows"):
        train_run("bad")
    assert seen == {"prepare": False}
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_a_failed_training_gives_the_heap_back(recorded_run):
    import gc

    train_run, seen = recorded_run
    with pytest.raises(RuntimeError, match="out of memory"):
        train_run("fails")
    assert seen["train"][:2] == (True, True)
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_a_resumed_run_logs_as_the_whole_run_and_clears_dead_temps(tiny_model_dir, tmp_path):
    """Resumed at step 3 of 6, with what killed writers left in the run folder: those go (one
    line says so), and every logged loss equals the uninterrupted run's, whose window at step 4
    spans the resume."""
    import shutil
    import socket

    flags = (
        "--gradient_accumulation_steps 1 --max_steps 6 --save_steps 3 --logging_steps 4 "
        "--lora_dropout 0.1 --learning_rate 1e-3 --seed 7 --torch_dtype float32"
    ).split()
    whole = selftune(
        "sft", "--model", tiny_model_dir, "--dataset", FIXTURES / "self_cognition.json",
        "--output_dir", tmp_path / "whole", *flags,
    )  # fmt: skip
    assert whole.returncode == 0, whole.stderr
    whole_dir = only_run_dir(tmp_path / "whole")
    run_dir = tmp_path / "resumed" / whole_dir.name
    shutil.copytree(whole_dir, run_dir)
    shutil.rmtree(run_dir / "checkpoint-6")
    dead = [
        run_dir / f".checkpoint-6.tmp-{socket.gethostname()}-999999999",
        run_dir / ".args.json.tmp-999999998",
    ]
    dead[0].mkdir()
    (dead[0] / "adapter_model.safetensors").write_bytes(b"half")
    dead[1].write_text("{")
    other_host = run_dir / ".checkpoint-6.tmp-another-host-999999999"
    other_host.mkdir()
    resumed = selftune(
        "sft", "--model", tiny_model_dir, "--dataset", FIXTURES / "self_cognition.json",
        "--output_dir", tmp_path / "resumed", *flags,
        "--resume_from_checkpoint", run_dir / "checkpoint-3",
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    said = [line for line in resumed.stderr.splitlines() if "leftover temporary" in line]
    assert len(said) == 1 and "removed 2 " in said[0]
    assert not any(p.exists() for p in dead) and other_host.is_dir()

    def logged(folder):
        lines = (folder / "logging.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"], r["token_acc"]) for r in map(json.loads, lines)]

    expected, got = logged(whole_dir), logged(run_dir)
    assert [step for step, _, _ in got] == [1, 4, 6]
    for (step, loss, acc), (want_step, want_loss, want_acc) in zip(got, expected):
        assert step == want_step and acc == want_acc
        assert loss == pytest.approx(want_loss, rel=1e-5)


def test_rows_cut_to_max_length_are_named_and_counted(tiny_model_dir, tmp_path):
    rows = [{"query": f"question {i}", "response": "a long answer " * (2 + 30 * (i % 2))}
            for i in range(8)]  # fmt: skip
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    done = selftune(
        "sft", "--model", tiny_model_dir, "--dataset", data, "--max_length", "64",
        "--max_steps", "1", "--output_dir", tmp_path / "out", "--torch_dtype", "float32",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (warning,) = [line for line in done.stderr.splitlines() if "longer than --max_length" in line]
    named = [f"{data} line {n} (truncated)" for n in (2, 4, 6, 8)]
    assert all(name in warning for name in named)
    args = json.loads((only_run_dir(tmp_path / "out") / "args.json").read_text())
    assert args["data"] == {"rows": 8, "kept": 8, "truncated": 4, "dropped": 0}


DIVERGING = (
    "--save_steps 1 --gradient_accumulation_steps 1 --torch_dtype float32 "
    "--lr_scheduler_type constant"
).split()


def diverging_run(model_dir, output, learning_rate, *extra):
    return selftune(
        "sft", "--model", model_dir, "--dataset", FIXTURES / "self_cognition.json",
        "--output_dir", output, "--learning_rate", learning_rate, *DIVERGING, *extra,
    )  # fmt: skip


def answer(checkpoint):
    done = selftune(
        "infer", "--adapters", checkpoint, "--temperature", "0", "--max_new_tokens", "8",
        stdin="你是谁?\n",
    )  # fmt: skip
    text = done.stdout.replace("<<<", "").strip()
    return done, text


def test_a_diverging_run_names_a_checkpoint_that_answers(tiny_model_dir, tmp_path):
    """A learning rate that blows the weights up a few steps in: the run stops, names the last
    checkpoint whose weights gave a finite loss, and that one answers."""
    done = diverging_run(
        tiny_model_dir, tmp_path / "out", "30", "--max_steps", "12",
        "--per_device_train_batch_size", "1",
    )  # fmt: skip
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert "the last good checkpoint is " in last and len(last) < 400, last
    named = Path(last.split("the last good checkpoint is ")[1].split()[0])
    assert named.is_dir()
    for weights in named.parent.glob("checkpoint-*/adapter_model.safetensors"):
        assert all(t.isfinite().all() for t in load_file(weights).values()), weights
    answered, text = answer(named)
    assert answered.returncode == 0 and text, answered.stderr


def test_a_run_that_diverges_at_once_names_no_checkpoint(tiny_model_dir, tmp_path):
    """The first update already breaks the model (its weights finite, every logit NaN): no
    checkpoint is called good, and generating from the one saved fails loudly."""
    done = diverging_run(tiny_model_dir, tmp_path / "out", "1e10", "--max_steps", "6")
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert "the loss became nan at step 2; no good checkpoint was saved" in last
    assert "checkpoint-1 holds the weights that diverged" in last
    (saved,) = (tmp_path / "out").glob("*/checkpoint-1")
    answered, text = answer(saved)
    assert answered.returncode == 1 and not text
    error = answered.stderr.strip().splitlines()[-1]
    assert error.startswith("selftune: error: the model gave non-finite logits")
