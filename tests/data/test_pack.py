"""Packing: bins, pack layout, and the proof that packed conversations do not see each other."""

import random

import pytest
import torch
import torch.nn.functional as F

from selftune.data.encode import IGNORE_INDEX, Example, encode_all
from selftune.data.pack import (
    bin_pack,
    pack_examples,
    packed_attention_mask,
    packed_inputs,
    pad_batch,
)


def example(n, start=0):
    ids = list(range(start, start + n))
    return Example(ids, [IGNORE_INDEX] * (n // 2) + ids[n // 2 :])


def test_bin_pack_places_every_row_once_within_the_budget():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(300)]
    bins = bin_pack(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    lower_bound = -(-sum(lengths) // 128)
    assert len(bins) <= lower_bound * 1.25  # decreasing best-fit packs tightly
    assert bin_pack([5, 5, 4, 3, 3], 10) == [[0, 1], [2, 3, 4]]


def test_pack_layout():
    (pack,) = pack_examples([example(4), example(2, 10), example(3, 20)], 16)
    assert pack.input_ids.tolist() == [[0, 1, 2, 3, 20, 21, 22, 10, 11]]
    assert pack.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1]]
    assert pack.cu_seqlens.tolist() == [0, 4, 7, 9] and pack.cu_seqlens.dtype == torch.int32
    assert pack.max_seqlen == 4
    # the first token of each conversation is never a target of the one before it
    assert pack.labels.tolist() == [[-100, -100, 2, 3, -100, 21, 22, -100, 11]]


def test_packed_attention_mask_is_block_diagonal_causal():
    (pack,) = pack_examples([example(3), example(2, 10)], 8)
    allowed = packed_attention_mask(pack.position_ids)[0, 0] == 0
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [0, 0, 0, 1, 0],
            [0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)
    assert torch.equal(
        packed_attention_mask(pack.cu_seqlens), packed_attention_mask(pack.position_ids)
    )


def test_pad_batch():
    batch = pad_batch([example(4), example(2, 10)], pad_id=7)
    assert batch["input_ids"].tolist() == [[0, 1, 2, 3], [10, 11, 7, 7]]
    assert batch["labels"].tolist() == [[-100, -100, 2, 3], [-100, 11, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def tiny_qwen2(vocab_size):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return Qwen2ForCausalLM(config).eval()


def token_losses(model, input_ids, labels, **inputs):
    """Per-target cross-entropy at labelled positions (next-token shift)."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=False, **inputs).logits.float()
    targets = labels[0, 1:]
    mask = targets != IGNORE_INDEX
    return F.cross_entropy(logits[0, :-1][mask], targets[mask], reduction="none")


@pytest.fixture()
def conversations_encoded(smol_tokenizer):
    rng = random.Random(1)
    words = ["the", "cat", "星河", "sat", "on", "a", "mat", "42", "why?"]
    conversations = []
    for _ in range(5):
        conversation = []
        for _ in range(rng.randint(1, 3)):
            conversation.append(
                {"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(2, 9)))}
            )
            conversation.append(
                {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(2, 15)))}
            )
        conversations.append(conversation)
    examples, _ = encode_all(smol_tokenizer, conversations, 512, None)
    return examples


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("isolation", ["position_ids", "4d_mask"])
def test_packed_losses_equal_separate_losses(
    tiny_llama, smol_tokenizer, conversations_encoded, architecture, attention, isolation
):
    model = tiny_llama if architecture == "llama" else tiny_qwen2(len(smol_tokenizer))
    model.set_attn_implementation(attention)
    examples = conversations_encoded
    (pack,) = pack_examples(examples, 4096)
    inputs = packed_inputs(pack)
    extra = {"position_ids": inputs["position_ids"]}
    if isolation == "4d_mask":
        extra["attention_mask"] = packed_attention_mask(pack.cu_seqlens, torch.float32)
    packed = token_losses(model, inputs["input_ids"], inputs["labels"], **extra)

    # the pack holds the examples in its own order: follow cu_seqlens to match them up
    bounds = pack.cu_seqlens.tolist()
    ids = pack.input_ids[0].tolist()
    order = [
        next(e for e in examples if e.input_ids == ids[a:b]) for a, b in zip(bounds, bounds[1:])
    ]
    separate = [
        token_losses(model, torch.tensor([e.input_ids]), torch.tensor([e.labels])) for e in order
    ]
    assert torch.allclose(packed, torch.cat(separate), atol=1e-5, rtol=0)
    weighted = sum(s.sum() for s in separate) / sum(len(s) for s in separate)
    assert abs(packed.mean() - weighted) < 1e-6

    # the control: the same pack with plain causal attention mixes conversations
    leaky = token_losses(model, inputs["input_ids"], inputs["labels"])
    assert not torch.allclose(leaky, torch.cat(separate), atol=1e-3)
