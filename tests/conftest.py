"""Shared fixtures: the real SmolLM2 tokenizer, tiny random models built from configs, the
embedded model itself (converted once into $SELFTUNE_HOME, then loaded in about a second), and
the runs that train it, made in the background while the other tests run (background.py)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from background import Background
from support import build_tiny_llama, build_tiny_qwen2  # noqa: F401


@pytest.fixture(scope="session")
def smol_folder():
    from selftune.models.resolve import embedded_folder

    return embedded_folder()


@pytest.fixture(scope="session")
def smol_tokenizer(smol_folder):
    from selftune.models.load import load_tokenizer

    return load_tokenizer(smol_folder)


@pytest.fixture()
def tiny_llama(smol_tokenizer):
    return build_tiny_llama(len(smol_tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    """A tiny random Llama with the real SmolLM2 tokenizer, saved as an HF folder."""
    folder = tmp_path_factory.mktemp("models") / "Tiny-Llama-Test"
    build_tiny_llama(len(smol_tokenizer)).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smol_model(smol_folder):
    """The embedded SmolLM2-135M-Instruct on CPU, shared by the slow integration tests."""
    from selftune.models.load import load_model

    model, tokenizer, _ = load_model(str(smol_folder), device="cpu")
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, smol_tokenizer):
    """A tiny random Qwen2 with the real SmolLM2 tokenizer, saved as an HF folder."""
    folder = tmp_path_factory.mktemp("models") / "Tiny-Qwen2-Test"
    build_tiny_qwen2(len(smol_tokenizer)).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


@dataclass
class IdentityDemo:
    output: Path
    checkpoint: Path
    stdout: str


def identity_demo_job(selftune, output: Path) -> IdentityDemo:
    """`selftune demo`: the embedded model before and after `sft` on the built-in identity with
    sft's defaults (replay of the base's own answers included: they ship with selftune for this
    model), then the held-out eval into the checkpoint's eval.json. Cut to 30 steps of 16 rows
    (the default run is 57; 20 leave English unlearnt) and 12 held-out questions per language.
    Set SELFTUNE_TEST_IDENTITY_DEMO to the output folder of this job to reuse it."""
    if os.environ.get("SELFTUNE_TEST_IDENTITY_DEMO"):
        output = Path(os.environ["SELFTUNE_TEST_IDENTITY_DEMO"])
        stdout = (output / "stdout.txt").read_text(encoding="utf-8")
    else:
        done = selftune("demo", "--output_dir", output, "--max_steps", "30", "--eval_limit", "12")
        assert done.returncode == 0, done.stderr[-3000:]
        stdout = done.stdout
        (output / "stdout.txt").write_text(stdout, encoding="utf-8")
    (line,) = [x for x in stdout.splitlines() if x.startswith("checkpoint: ")]
    return IdentityDemo(output, Path(line.removeprefix("checkpoint: ")), stdout)


@dataclass
class TutorialRun:
    checkpoint: Path
    answer: subprocess.CompletedProcess


def tutorial_run_job(selftune, output: Path) -> TutorialRun:
    """The tutorial's 8 self-cognition rows on the embedded model with no flags but model and
    data, as the README runs them, but cut to 20 of the 60 steps its defaults plan (15 are
    enough, 10 are not); then asked who it is."""
    data = Path(__file__).parent / "fixtures" / "self_cognition.json"
    done = selftune(
        "sft", "--model", "smollm2-135m", "--dataset", data, "--output_dir", output,
        "--max_steps", "20",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("last checkpoint: ")]
    checkpoint = Path(line.removeprefix("last checkpoint: "))
    answer = selftune("infer", "--adapters", checkpoint, "--temperature", "0",
                      "--max_new_tokens", "40", stdin="你是谁?\n")  # fmt: skip
    return TutorialRun(checkpoint, answer)


# The background runs, in the order they run; the fixture of each has the job's name.
BACKGROUND_JOBS = {"identity_demo": identity_demo_job, "tutorial_run": tutorial_run_job}


def pytest_collection_modifyitems(items):
    """Tests that wait on a background run go last, in the order the runs finish, so the other
    tests run while the models train."""
    lane = {name: i + 1 for i, name in enumerate(BACKGROUND_JOBS)}
    items.sort(key=lambda item: max((lane.get(name, 0) for name in item.fixturenames), default=0))


@pytest.fixture(scope="session", autouse=True)
def background(request, tmp_path_factory):
    """Starts the background runs that the selected tests need (none for a quick subset)."""
    items = request.session.items
    needed = [name for name in BACKGROUND_JOBS if any(name in i.fixturenames for i in items)]
    runs = Background(BACKGROUND_JOBS, tmp_path_factory.mktemp("background"))
    if needed:
        request.getfixturevalue("smol_folder")  # converted once, before the runs load it
    runs.want(needed)
    yield runs
    runs.stop()


@pytest.fixture(scope="session")
def identity_demo(background) -> IdentityDemo:
    return background.result("identity_demo")


@pytest.fixture(scope="session")
def identity_checkpoint(identity_demo) -> Path:
    """The demo's checkpoint: the embedded model tuned on the built-in identity."""
    return identity_demo.checkpoint


@pytest.fixture(scope="session")
def tutorial_run(background) -> TutorialRun:
    return background.result("tutorial_run")


@pytest.fixture(scope="session")
def identity_exports(identity_checkpoint, tmp_path_factory):
    """`selftune export` of the identity checkpoint: merged HF folder, GGUF f16 and q8_0."""
    from selftune.cli import main

    root = tmp_path_factory.mktemp("identity-exports")
    folders = {"merged": root / "merged", "f16": root / "gguf-f16", "q8_0": root / "gguf-q8_0"}
    ckpt = str(identity_checkpoint)
    assert main(["export", "--adapters", ckpt, "--output_dir", str(folders["merged"])]) == 0
    for gguf_type in ("f16", "q8_0"):
        flags = ["--to_gguf", "true", "--gguf_type", gguf_type, "--to_ollama", "true"]
        flags += ["--output_dir", str(folders[gguf_type])]
        assert main(["export", "--adapters", ckpt, *flags]) == 0
    return folders
