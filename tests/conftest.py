"""Shared fixtures: the real SmolLM2 tokenizer, tiny random models built from configs, and the
embedded model itself (converted once into $SELFTUNE_HOME, then loaded in about a second)."""

from __future__ import annotations

import pytest
from support import build_tiny_llama, build_tiny_qwen2  # noqa: F401


@pytest.fixture(scope="session")
def smol_folder():
    from selftune.models import embedded_folder

    return embedded_folder()


@pytest.fixture(scope="session")
def smol_tokenizer(smol_folder):
    from selftune.models import load_tokenizer

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
    from selftune.models import load_model

    model, tokenizer, _ = load_model(str(smol_folder), device="cpu")
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, smol_tokenizer):
    """A tiny random Qwen2 with the real SmolLM2 tokenizer, saved as an HF folder."""
    folder = tmp_path_factory.mktemp("models") / "Tiny-Qwen2-Test"
    build_tiny_qwen2(len(smol_tokenizer)).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def identity_checkpoint(tmp_path_factory):
    """The embedded model tuned on the built-in identity by `selftune sft` with its defaults
    (replay of the base's own answers included: they ship with selftune for this model), cut to
    30 steps of 16 rows to keep the suite short (the default run is 57). Set
    SELFTUNE_TEST_IDENTITY_CHECKPOINT to reuse a checkpoint made by this same command."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if os.environ.get("SELFTUNE_TEST_IDENTITY_CHECKPOINT"):
        return Path(os.environ["SELFTUNE_TEST_IDENTITY_CHECKPOINT"])
    output = tmp_path_factory.mktemp("identity-run")
    flags = ["--model", "smollm2-135m", "--dataset", "identity", "--output_dir", str(output)]
    flags += ["--model_name", "星河", "Xinghe", "--model_author", "北辰实验室", "Beichen Lab"]
    flags += ["--max_steps", "30"]
    done = subprocess.run(
        [sys.executable, "-m", "selftune", "sft", *flags],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("last checkpoint: ")]
    return Path(line.removeprefix("last checkpoint: "))


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
