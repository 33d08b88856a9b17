"""The static-cache decode path gives the plain loop's tokens (run eagerly here, on CPU)."""

import pytest
import torch

from selftune.infer import static_decode
from selftune.infer.generate import decode_steps, generate
from selftune.infer.sampling import SamplingParams
from tests.support import build_tiny_gemma2, build_tiny_llama, build_tiny_qwen2

VOCAB = 300
PROMPTS = [[5, 17, 42, 99, 7], list(range(3, 40))]


def plain_tokens(model, prompt, params, end_ids=frozenset()):
    return [step[0] for step in decode_steps(model, [prompt], params, set(end_ids), pad_id=0)]


def static_tokens(model, prompt, params, end_ids=frozenset()):
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    return list(static_decode.static_steps(model, prompt, params, set(end_ids), generator))


@pytest.fixture(params=["llama", "qwen2"])
def model(request):
    build = {"llama": build_tiny_llama, "qwen2": build_tiny_qwen2}[request.param]
    model = build(VOCAB, seed=3)
    with torch.no_grad():  # larger weights: each token's answer depends on the whole context
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                param.mul_(8)
    return model


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_equal_the_plain_loop(model, prompt):
    params = SamplingParams(max_new_tokens=24)
    expected = plain_tokens(model, prompt, params)
    assert len(expected) == 24
    assert static_tokens(model, prompt, params) == expected


def test_cache_grows_past_its_first_bucket(model, monkeypatch):
    """An answer longer than its first bucket moves to the next one and decodes on unchanged."""
    monkeypatch.setattr(static_decode, "FIRST_BUCKET", 16)
    monkeypatch.setattr(static_decode, "LOOKAHEAD", 4)
    params = SamplingParams(max_new_tokens=60)
    expected = plain_tokens(model, PROMPTS[0], params)
    assert static_tokens(model, PROMPTS[0], params) == expected
    lengths = sorted(static_decode.decoder_for(model).buckets)
    assert lengths[0] == 16 and lengths[-1] >= len(PROMPTS[0]) + 60


def test_sampling_with_penalty_equals_the_plain_loop(model):
    params = SamplingParams(
        temperature=0.9, top_p=0.9, top_k=40, repetition_penalty=1.3, max_new_tokens=20, seed=5
    )
    assert static_tokens(model, PROMPTS[1], params) == plain_tokens(model, PROMPTS[1], params)


def test_stops_at_an_end_token(model):
    params = SamplingParams(max_new_tokens=24)
    expected = plain_tokens(model, PROMPTS[0], params)
    end = expected[5]
    got = static_tokens(model, PROMPTS[0], params, {end})
    assert got == expected[: expected.index(end) + 1]


def test_second_answer_on_a_reused_cache_is_unchanged(model):
    """Stale keys and values from an earlier, longer answer stay masked."""
    params = SamplingParams(max_new_tokens=30)
    static_tokens(model, PROMPTS[1], params)
    assert static_tokens(model, PROMPTS[0], params) == plain_tokens(model, PROMPTS[0], params)


def test_lora_adapter_on_and_off(model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear")).eval()
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    params = SamplingParams(max_new_tokens=20)
    tuned = static_tokens(peft_model, PROMPTS[0], params)
    assert tuned == plain_tokens(peft_model, PROMPTS[0], params)
    with peft_model.disable_adapter():
        base = static_tokens(peft_model, PROMPTS[0], params)
        assert base == plain_tokens(peft_model, PROMPTS[0], params)
    assert base != tuned
    states = {key[1] for key in static_decode.decoder_for(peft_model).steps}
    assert len(states) == 2  # one step per adapter state


def test_grouped_lora_decodes_as_peft_and_follows_new_adapter_weights(model):
    """On the GPU the decoder routes LoRA layers through grouped LoRA, whose decode reads cast
    adapters cached in place (captured graphs hold their addresses): an answer equals PEFT's,
    also after the adapter weights change, and a routing change drops the old groups."""
    import copy

    from peft import LoraConfig, get_peft_model

    from selftune.accel.lora_routing import fuse_lora, lora_groups, unfuse_lora

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear")).eval()
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    reference = copy.deepcopy(peft_model)  # keeps PEFT's own forward
    params = SamplingParams(max_new_tokens=20)
    fuse_lora(peft_model)  # as decoder_for does on a GPU
    assert static_tokens(peft_model, PROMPTS[0], params) == plain_tokens(
        reference, PROMPTS[0], params
    )
    group = lora_groups(peft_model)[0]
    slot = ("default", False, True)  # no grad, inference mode: the decode's cache
    cached = group.lowrank[slot][1][0]
    old = cached.clone()
    torch.manual_seed(9)
    with torch.no_grad():  # new adapter weights of the same shapes, as a reload writes them
        for (name, param), (_, twin) in zip(
            peft_model.named_parameters(), reference.named_parameters()
        ):
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.5)
                twin.copy_(param)
    decoder = static_decode.decoder_for(peft_model)
    assert group in decoder.lora_groups
    with torch.inference_mode():
        decoder.prepare()  # what runs before each answer, ahead of any replay
    assert group.lowrank[slot][1][0] is cached and not torch.equal(cached, old)  # in place
    changed = plain_tokens(reference, PROMPTS[0], params)
    assert static_tokens(peft_model, PROMPTS[0], params) == changed
    unfuse_lora(peft_model)
    assert static_tokens(peft_model, PROMPTS[0], params) == changed
    assert decoder.lora_groups == []  # PEFT's forward again (on a CPU nothing re-routes)


def test_generate_uses_it_for_one_row_and_falls_back(tiny_llama, smol_tokenizer, monkeypatch):
    question = [[{"role": "user", "content": "Hello there"}]]
    params = SamplingParams(max_new_tokens=10)
    plain = generate(tiny_llama, smol_tokenizer, question, params)[0]
    calls = []
    real = static_decode.static_steps

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(static_decode, "wanted", lambda model, rows, kwargs: rows == 1)
    monkeypatch.setattr(static_decode, "static_steps", counted)
    assert generate(tiny_llama, smol_tokenizer, question, params)[0].text == plain.text
    assert calls
    decoder = tiny_llama._selftune_static_decoder
    assert isinstance(decoder, static_decode.StaticDecoder) and decoder.buckets  # it decoded

    def broken(*args, **kwargs):
        raise RuntimeError("capture failed")
        yield  # a generator, as the real one

    monkeypatch.setattr(static_decode, "static_steps", broken)
    assert generate(tiny_llama, smol_tokenizer, question, params)[0].text == plain.text
    assert tiny_llama._selftune_static_decoder is False  # plain loop from now on


def test_no_tokens_asked_none_given(model):
    assert static_tokens(model, PROMPTS[0], SamplingParams(max_new_tokens=0)) == []


def test_unsupported_models_keep_the_plain_loop():
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    gemma = build_tiny_gemma2(VOCAB)  # sliding-window layers named in layer_types
    assert "sliding-window" in static_decode.unsupported_reason(gemma)
    shape = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    mistral = MistralForCausalLM(MistralConfig(sliding_window=64, **shape))  # no layer_types
    assert "sliding-window" in static_decode.unsupported_reason(mistral)
    full = MistralForCausalLM(MistralConfig(sliding_window=None, **shape))
    assert static_decode.unsupported_reason(full) is None
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    dynamic = LlamaForCausalLM(LlamaConfig(rope_parameters=rope, **shape))
    assert "RoPE" in static_decode.unsupported_reason(dynamic)
    llama = build_tiny_llama(VOCAB)
    assert static_decode.unsupported_reason(llama) is None
    llama.config._attn_implementation = "flash_attention_2"
    assert "4-D mask" in static_decode.unsupported_reason(llama)
    assert not static_decode.wanted(build_tiny_llama(VOCAB), 1, None)  # CPU
