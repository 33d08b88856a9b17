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
