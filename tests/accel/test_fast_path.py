"""What the training fast path switches on, and that it gives the model back afterwards."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from support import build_tiny_gemma2, build_tiny_llama, build_tiny_qwen2

from selftune.accel.fast_path import disable_fast_path, enable_fast_path, packs_safely
from selftune.accel.memory import (
    MARGIN,
    activation_bytes,
    auto_checkpoint_layers,
    choose_checkpointing,
    decoder_layers,
    memory_is_modelled,
    set_checkpointing,
)


def test_cuda_fast_path_routes_lora_layers_and_gives_them_back():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        build_tiny_llama(300), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    base = model.get_base_model()
    assert enable_fast_path(base, "cpu", packing=True) == []  # nothing off the GPU
    enabled = enable_fast_path(base, "cuda", packing=False, liger=False)
    assert "grouped bf16 LoRA (14 layers)" in enabled
    q_proj = base.model.layers[0].self_attn.q_proj
    assert "forward" in vars(q_proj)
    disable_fast_path(base)
    assert "forward" not in vars(q_proj) and not hasattr(q_proj, "_selftune_group")


def test_checkpointing_covers_only_the_layers_memory_needs():
    from peft import LoraConfig, get_peft_model

    from selftune.accel.lora_routing import fuse_lora

    model = get_peft_model(  # 2 layers, hidden 32, intermediate 64, grouped LoRA
        build_tiny_llama(300), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    ).get_base_model()
    fuse_lora(model)
    plain, checked = activation_bytes(model.config)
    assert (plain, checked) == (20 * 32 + 8 * 64, 2 * 32)
    tokens = 1000
    unchecked = 3 * plain * tokens  # 2 layers and one more for backward's working set
    assert auto_checkpoint_layers(model, tokens, MARGIN + unchecked) == 0
    one_layer = MARGIN + unchecked - (plain - checked) * tokens
    assert auto_checkpoint_layers(model, tokens, one_layer) == 1
    assert auto_checkpoint_layers(model, tokens, one_layer - 1) is None  # both layers
    assert auto_checkpoint_layers(model, tokens, 0) is None


def test_explicit_checkpointing_flags_win():
    model = build_tiny_llama(300)
    assert choose_checkpointing(model, True, "cuda", 10**9)[0] is None
    assert choose_checkpointing(model, False, "cuda", 10**9)[0] == 0
    assert choose_checkpointing(model, None, "cpu", 10**9)[0] == 0


@pytest.mark.parametrize("layers, flags", [(None, [True, True]), (1, [True, False]), (0, [])])
def test_set_checkpointing_marks_the_first_layers_under_the_current_name(layers, flags):
    """transformers 5.25 renamed gradient_checkpointing_enable; the old name warns (FutureWarning)
    and goes in v6, so the new one is called where it exists."""
    model = build_tiny_llama(300)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        set_checkpointing(model, layers)
    checked = [layer.gradient_checkpointing for layer in decoder_layers(model)]
    assert checked == (flags or [False, False])
    ids = torch.tensor([[5, 6, 7, 8]])
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()  # the checkpointed layers recompute
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_packing_is_automatic_only_where_it_is_exact():
    assert packs_safely(build_tiny_llama(300)) and packs_safely(build_tiny_qwen2(300))
    assert not packs_safely(build_tiny_gemma2(300))  # soft-capped, sliding-window attention
    windowed = build_tiny_llama(300)
    windowed.config.model_type, windowed.config.sliding_window = "mistral", 64
    assert not packs_safely(windowed)


def test_unmodelled_memory_keeps_every_layer_checkpointed():
    full = build_tiny_llama(300).requires_grad_(True)  # a full fine-tune
    assert not memory_is_modelled(full)
    assert choose_checkpointing(full, None, "cuda", 10**6) == (None, "gradient checkpointing on")


def test_cuda_graphs_plan_room_for_a_second_pass(monkeypatch):
    import torch
    from peft import LoraConfig, get_peft_model

    from selftune.accel.lora_routing import fuse_lora

    model = get_peft_model(
        build_tiny_llama(300), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    ).get_base_model()
    fuse_lora(model)
    plain, _ = activation_bytes(model.config)
    tokens = 1000
    free = MARGIN + 3 * plain * tokens  # one pass fits with no layer checkpointed
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    assert choose_checkpointing(model, None, "cuda", tokens)[0] == 0
    layers, said = choose_checkpointing(model, None, "cuda", tokens, graph_tokens=tokens)
    assert layers == auto_checkpoint_layers(model, 2 * tokens, free) and layers != 0
    assert f"CUDA graph of {tokens} tokens" in said and f"up to {tokens} tokens" in said


def test_varlen_attention_only_for_16_bit_weights(monkeypatch):
    """The flash kernels behind varlen attention take fp16/bf16 only: float32 weights on a GPU
    keep the masked SDPA for packed rows."""
    import torch

    from selftune.accel.kernels import attention

    monkeypatch.setattr(attention, "varlen_available", lambda: True)  # as on a GPU
    fp32 = build_tiny_llama(300)
    before = fp32.config._attn_implementation
    enabled = enable_fast_path(fp32, "cuda", packing=True, liger=False, grouped_lora=False)
    assert "varlen attention for packed rows" not in enabled
    assert fp32.config._attn_implementation == before != attention.NAME
    bf16 = build_tiny_llama(300).to(torch.bfloat16)
    enabled = enable_fast_path(bf16, "cuda", packing=True, liger=False, grouped_lora=False)
    assert "varlen attention for packed rows" in enabled
    assert bf16.config._attn_implementation == attention.NAME


@pytest.fixture
def fake_liger(monkeypatch):
    """`liger_kernel.transformers` whose Llama patch rebinds the modeling module's names as
    Liger's does: its RoPE a Triton kernel that takes CUDA tensors only."""
    import importlib.machinery
    import types

    from transformers.models.llama import modeling_llama

    calls = []

    def kernel_rope(q, k, *args, **kwargs):
        if not q.is_cuda:
            raise ValueError("Pointer argument (at 0) cannot be accessed from Triton (cpu tensor?)")
        calls.append("kernel")
        return q, k

    class FakeNorm(torch.nn.Module):
        pass

    def apply_liger_kernel_to_llama(model=None, **flags):
        modeling_llama.apply_rotary_pos_emb = kernel_rope
        modeling_llama.LlamaRMSNorm = FakeNorm
        modeling_llama.LlamaMLP = FakeNorm

    package = types.ModuleType("liger_kernel")
    package.__spec__ = importlib.machinery.ModuleSpec("liger_kernel", None)
    transformers_part = types.ModuleType("liger_kernel.transformers")
    transformers_part.apply_liger_kernel_to_llama = apply_liger_kernel_to_llama
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", transformers_part)
    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))  # put back after
    return modeling_llama, calls


def test_liger_leaves_later_models_and_cpu_tensors_to_the_library(fake_liger):
    from types import SimpleNamespace

    from selftune.accel.liger import apply_liger

    modeling_llama, calls = fake_liger
    rope, library_norm = modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm
    library_rope = getattr(rope, "library", rope)  # on a GPU the real Liger may have run before
    assert apply_liger(build_tiny_llama(300))
    assert apply_liger(build_tiny_llama(300))  # twice (training, then decoding): still one level
    assert modeling_llama.LlamaRMSNorm is library_norm
    later = build_tiny_llama(300)  # a CPU model built after: the library's modules, and it runs
    assert isinstance(later.model.norm, library_norm)
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(later(ids).logits, build_tiny_llama(300)(ids).logits)
    assert modeling_llama.apply_rotary_pos_emb.library is library_rope
    cuda = SimpleNamespace(is_cuda=True)
    assert modeling_llama.apply_rotary_pos_emb(cuda, cuda, None, None) == (cuda, cuda)
    assert calls == ["kernel"]


def test_liger_failing_half_way_leaves_the_classes_as_they_were(fake_liger):
    from selftune.accel.liger import apply_liger

    modeling_llama, _ = fake_liger
    library_norm = modeling_llama.LlamaRMSNorm
    patch = sys.modules["liger_kernel.transformers"].apply_liger_kernel_to_llama

    def fails_half_way(model=None, **flags):
        patch(model=model, **flags)
        raise RuntimeError("no kernel for this GPU")

    sys.modules["liger_kernel.transformers"].apply_liger_kernel_to_llama = fails_half_way
    with pytest.raises(RuntimeError, match="no kernel"):
        apply_liger(build_tiny_llama(300))
    assert modeling_llama.LlamaRMSNorm is library_norm
    build_tiny_llama(300)(torch.tensor([[5, 6, 7]]))  # a CPU model still builds and runs
