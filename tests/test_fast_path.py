"""What the training fast path switches on, and that it gives the model back afterwards."""

from __future__ import annotations

from support import build_tiny_llama

from selftune.fast_path import (
    MARGIN,
    activation_bytes,
    auto_checkpoint_layers,
    choose_checkpointing,
    disable_fast_path,
    enable_fast_path,
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
    model = build_tiny_llama(300)  # 2 layers, hidden 32, intermediate 64
    plain, checked = activation_bytes(model.config)
    assert (plain, checked) == (20 * 32 + 8 * 64, 2 * 32)
    tokens = 1000
    all_plain = 2 * plain * tokens
    assert auto_checkpoint_layers(model, tokens, MARGIN + all_plain) == 0
    one_layer = MARGIN + all_plain - (plain - checked) * tokens
    assert auto_checkpoint_layers(model, tokens, one_layer) == 1
    assert auto_checkpoint_layers(model, tokens, one_layer - 1) is None  # both layers
    assert auto_checkpoint_layers(model, tokens, 0) is None


def test_explicit_checkpointing_flags_win():
    model = build_tiny_llama(300)
    assert choose_checkpointing(model, True, "cuda", 10**9)[0] is None
    assert choose_checkpointing(model, False, "cuda", 10**9)[0] == 0
    assert choose_checkpointing(model, None, "cpu", 10**9)[0] == 0
