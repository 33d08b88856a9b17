"""Shared fixtures: the real SmolLM2 tokenizer, tiny random models built from configs, and the
embedded model itself (converted once into $SELFTUNE_HOME, then loaded in about a second)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def smol_folder():
    from selftune.models import embedded_folder

    return embedded_folder()


@pytest.fixture(scope="session")
def smol_tokenizer(smol_folder):
    from selftune.models import load_tokenizer

    return load_tokenizer(smol_folder)


def build_tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


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


def build_tiny_qwen2(vocab_size: int, seed: int = 0):
    """A tiny random Qwen2 (attention biases, untied output head)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, smol_tokenizer):
    """A tiny random Qwen2 with the real SmolLM2 tokenizer, saved as an HF folder."""
    folder = tmp_path_factory.mktemp("models") / "Tiny-Qwen2-Test"
    build_tiny_qwen2(len(smol_tokenizer)).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


TINY_SYSTEM = "You are Xinghe, an assistant made by Beichen Lab."


def make_adapter_checkpoint(
    base_dir, checkpoint, system=TINY_SYSTEM, use_dora=False, seed=0, eval_json=None
):
    """A checkpoint as `selftune sft` writes one: a PEFT adapter whose lora_B is random (so it
    changes the outputs), and args.json naming the base and the training system prompt."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, use_dora=use_dora
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    model.save_pretrained(checkpoint)
    args = {
        "model": str(base_dir),
        "system": system,
        "model_name": ["星河", "Xinghe"],
        "model_author": ["北辰实验室", "Beichen Lab"],
        "train_type": "dora" if use_dora else "lora",
        "dataset": ["identity"],
        "lora_rank": 4,
        "lora_alpha": 8,
        "learning_rate": 0.001,
        "seed": seed,
    }
    (checkpoint / "args.json").write_text(json.dumps(args, ensure_ascii=False), encoding="utf-8")
    if eval_json is not None:
        (checkpoint / "eval.json").write_text(json.dumps(eval_json), encoding="utf-8")
    return checkpoint


IDENTITY_QUESTIONS = {"你是谁?": "星河", "Who are you?": "Xinghe"}


@pytest.fixture(scope="session")
def identity_checkpoint(tmp_path_factory):
    """The embedded model tuned on the built-in identity by `selftune sft` with its defaults,
    cut to 30 steps of 16 rows to keep the suite short (the default run is 53). Set
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
