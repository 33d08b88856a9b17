"""Stacked decode projections (selftune.accel.kernels.stacked): the decode path of the GPU, run eagerly
here on the CPU, gives the tokens of the unstacked model (PEFT's own forward for LoRA)."""

from __future__ import annotations

import copy

import pytest
import torch
from support import build_tiny_llama, build_tiny_qwen2, with_lora

from selftune.accel.kernels.stacked import Stack
from selftune.accel.lora_routing import lora_groups, unfuse_lora
from selftune.infer import static_decode
from selftune.infer.generate import decode_steps
from selftune.infer.sampling import SamplingParams
from selftune.train.loop import accumulate_gradients

VOCAB = 300
PROMPT = [5, 17, 42, 99, 7, 3, 250]
PARAMS = SamplingParams(max_new_tokens=16)


def sharpened(builder):
    model = builder(VOCAB, seed=3)
    with torch.no_grad():  # larger weights: each token depends on the whole context
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                param.mul_(8)
    return model


def plain(model) -> list[int]:
    return [step[0] for step in decode_steps(model, [PROMPT], PARAMS, set(), pad_id=0)]


def fast(model) -> list[int]:
    """Decode with what the GPU gets: grouped LoRA and stacked projections (no graphs here)."""
    decoder = getattr(model, "_selftune_static_decoder", None)
    if decoder is None or decoder.model is not model:  # (a PeftModel passes attributes on)
        model._selftune_static_decoder = static_decode.StaticDecoder(model, False, fast=True)
    return list(static_decode.static_steps(model, PROMPT, PARAMS, set()))


def stacks_of(model) -> list[Stack]:
    return model._selftune_static_decoder.stacks


@pytest.mark.parametrize("builder", [build_tiny_llama, build_tiny_qwen2])
def test_base_model_decodes_the_same_on_one_buffer_per_input(builder, tmp_path):
    from transformers import AutoModelForCausalLM

    model = sharpened(builder)
    reference = copy.deepcopy(model)
    assert fast(model) == plain(reference)
    stacks = stacks_of(model)
    assert len(stacks) == 2 * 2  # q/k/v and gate/up of both layers; o and down stay alone
    attention = model.model.layers[0].self_attn
    (qkv,) = [s for s in stacks if attention.q_proj in s.modules]
    assert attention.k_proj.weight.data_ptr() == qkv.weight[qkv.outs[0]].data_ptr()  # a view
    assert qkv.rank == 0 and qkv.weight.shape[0] == sum(qkv.outs)
    params = sum(p.numel() for p in model.parameters())
    assert params == sum(p.numel() for p in reference.parameters())
    model.save_pretrained(tmp_path, safe_serialization=True)  # views save as plain weights
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for (name, saved), want in zip(loaded.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(saved, want, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("builder", [build_tiny_llama, build_tiny_qwen2])
def test_lora_decodes_as_peft_on_off_merged_and_after_new_weights(builder, monkeypatch):
    modes = []
    real_run = Stack.run
    monkeypatch.setattr(
        Stack, "run", lambda self, x, mode: modes.append(mode) or real_run(self, x, mode)
    )
    model = with_lora(sharpened(builder))
    reference = copy.deepcopy(model)  # keeps PEFT's own forward and separate weights
    expected = plain(reference)
    assert fast(model) == expected
    stacks = stacks_of(model)
    assert len(stacks) == 4 * 2 and all(s.loaded == "default" and s.rank for s in stacks)
    assert modes == ["lora"] * len(stacks) * (PARAMS.max_new_tokens - 1)  # every one-token step
    with model.disable_adapter(), reference.disable_adapter():
        base = plain(reference)
        assert fast(model) == base != expected
    assert modes.count("base") == len(stacks) * (PARAMS.max_new_tokens - 1)
    model.merge_adapter()
    model.unmerge_adapter()
    assert all(s.intact() for s in stacks)  # merging wrote into the buffer, in place
    torch.manual_seed(11)
    with torch.no_grad():  # new adapter weights, as a reload writes them
        for (name, param), (_, twin) in zip(model.named_parameters(), reference.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.4)
                twin.copy_(param)
    changed = plain(reference)
    assert changed != expected and fast(model) == changed


def test_merge_then_decode_equals_the_merged_reference():
    model = with_lora(sharpened(build_tiny_qwen2))
    reference = copy.deepcopy(model)
    fast(model)
    model.merge_adapter()
    reference.merge_adapter()
    assert fast(model) == plain(reference)


def test_training_after_a_stacked_decode_gives_the_same_gradients():
    """The buffers are built under inference mode but are no inference tensors: the model still
    trains, and its gradients are those of the unstacked twin."""
    model = with_lora(sharpened(build_tiny_llama))
    reference = copy.deepcopy(model)
    fast(model)  # grouped LoRA and the stacks stay routed: training takes their fallbacks
    batch = {
        "input_ids": torch.tensor([PROMPT * 2]),
        "labels": torch.tensor([PROMPT * 2]),
    }
    grads = []
    for m in (model, reference):
        m.train()
        accumulate_gradients(m, [batch])
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_base_stack_is_released_when_an_adapter_model_restacks_it():
    """The bench's order: the base model decodes, then gets an adapter and decodes again. The
    base model's stacks go (no second copy of the weights), and with them its graphs."""
    from selftune.accel import lora_routing as lora

    model = sharpened(build_tiny_qwen2)
    reference = with_lora(copy.deepcopy(model))
    fast(model)
    old = stacks_of(model)
    tuned = with_lora(model)
    with torch.no_grad():  # the same adapter on the twin
        for (name, param), (_, twin) in zip(tuned.named_parameters(), reference.named_parameters()):
            if "lora_" in name:
                twin.copy_(param)
    routings = lora.ROUTINGS[0]
    assert fast(tuned) == plain(reference)
    assert all(s.released and s.weight.numel() == 0 for s in old)
    assert lora.ROUTINGS[0] > routings  # every decoder drops what it captured over them
    attention = tuned.base_model.model.model.layers[0].self_attn
    (qkv,) = [s for s in stacks_of(tuned) if attention.q_proj in s.modules]
    assert attention.v_proj.base_layer.weight.data_ptr() == qkv.weight[sum(qkv.outs[:2])].data_ptr()
    assert lora_groups(tuned)  # grouped LoRA under the stacks, for prompts


def test_a_second_decoder_reuses_and_reroutes_the_stacks(monkeypatch):
    """A new decoder on a stacked model (after training undid the routing) takes the same
    stacks and routes them again over the new grouped-LoRA forwards."""
    model = with_lora(sharpened(build_tiny_llama))
    reference = copy.deepcopy(model)
    fast(model)
    first = stacks_of(model)
    unfuse_lora(model)  # what training's disable_fast_path does
    model._selftune_static_decoder = None
    modes = []
    real_run = Stack.run
    monkeypatch.setattr(
        Stack, "run", lambda self, x, mode: modes.append(mode) or real_run(self, x, mode)
    )
    assert fast(model) == plain(reference)
    assert stacks_of(model) == first and modes and set(modes) == {"lora"}


@pytest.mark.parametrize(
    "targets", [["up_proj", "down_proj"], ["q_proj", "v_proj"], ["k_proj", "v_proj", "o_proj"]]
)
def test_adapters_on_some_projections_only(targets):
    """LoRA layers and plain ones of one input are stacked apart (PEFT's Llama default adapts
    q and v alone): on, and off as the server's base requests run it."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(sharpened(build_tiny_qwen2), LoraConfig(r=4, target_modules=targets))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.eval()
    reference = copy.deepcopy(model)
    assert fast(model) == plain(reference)
    for stack in stacks_of(model):
        assert len({hasattr(m, "lora_A") for m in stack.modules}) == 1
    with model.disable_adapter(), reference.disable_adapter():
        assert fast(model) == plain(reference)


def test_switching_adapters_per_answer_as_the_server_does():
    """Two adapters (one of another rank), switched with set_adapter between answers."""
    from peft import LoraConfig

    model = with_lora(sharpened(build_tiny_llama))
    model.add_adapter("other", LoraConfig(r=4, target_modules="all-linear"))
    model.add_adapter("wide", LoraConfig(r=6, target_modules="all-linear"))
    torch.manual_seed(4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    reference = copy.deepcopy(model)
    answers = {}
    for name in ["default", "other", "wide", "default", "other"]:
        model.set_adapter(name)
        reference.set_adapter(name)
        want = plain(reference)
        assert fast(model) == want, name
        answers.setdefault(name, want)
        assert answers[name] == want
    assert len({tuple(a) for a in answers.values()}) == 3
    # "wide" has other ranks than the buffers hold: it runs through grouped LoRA instead
    steps = model._selftune_static_decoder.steps
    assert len({key[1] for key in steps}) == 3
    # "other" again under the same name at another rank: what a graph of it read moved, so a
    # new step is captured (on a GPU the old graph would replay over freed buffers)
    for m in (model, reference):
        m.delete_adapter("other")
        m.add_adapter("other", LoraConfig(r=2, target_modules="all-linear"))
        m.set_adapter("other")
    with torch.no_grad():
        for (name, param), (_, twin) in zip(model.named_parameters(), reference.named_parameters()):
            if ".other." in name:  # (A drew other random numbers on each model)
                param.normal_(0, 0.5)
                twin.copy_(param)
    assert fast(model) == plain(reference)
    others = [key for key in steps if key[1][0][2] == ("other",)]
    assert len(others) == 2


def test_a_one_token_forward_after_an_update_reads_the_new_adapter():
    """Outside `prepare` (an eager one-token forward after the adapter moved) the stacks
    notice the new weights themselves."""
    model = with_lora(sharpened(build_tiny_qwen2))
    reference = copy.deepcopy(model)
    fast(model)
    with torch.no_grad():
        for (name, param), (_, twin) in zip(model.named_parameters(), reference.named_parameters()):
            if "lora_B" in name:
                param.mul_(-1.5)
                twin.copy_(param)
        ids = torch.tensor([[PROMPT[0]]])
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_a_safe_merge_decodes_as_the_merged_reference():
    """PEFT's safe merge replaced each weight's .data up to 0.21 and copies into it since 0.22:
    either way the stacked decode gives the merged model's tokens."""
    model = with_lora(sharpened(build_tiny_llama))
    reference = copy.deepcopy(model)
    before = fast(model)
    model.merge_adapter(safe_merge=True)
    reference.merge_adapter(safe_merge=True)
    assert fast(model) == plain(reference)
    reference.unmerge_adapter()
    assert plain(reference) == before


def test_replaced_weights_release_the_stacks():
    """A base weight replaced under the stacks (a state-dict load with assign=True) is no view
    of their buffer any more: the stacks go, and the decode reads the new weights."""
    model = with_lora(sharpened(build_tiny_llama))
    reference = copy.deepcopy(model)
    before = fast(model)
    stacks = stacks_of(model)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "base_layer.weight" in name:
                param.copy_(param.roll(1, dims=0))
    assert plain(reference) != before  # the new weights decode differently
    model.load_state_dict({k: v.clone() for k, v in reference.state_dict().items()}, assign=True)
    assert not any(s.intact() for s in stacks)
    assert fast(model) == plain(reference)
    assert all(s.released for s in stacks) and stacks_of(model) == []
