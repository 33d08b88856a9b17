"""Compiling the training step's Triton kernels during the model load (kernels.precompile)."""

from __future__ import annotations

import pytest
import torch
from support import build_tiny_qwen2

from selftune.accel.kernels import ce_rows, dropout, load_triton, swiglu
from selftune.accel.kernels.precompile import model_shapes, precompile


@pytest.fixture
def tiny_config_dir(tmp_path):
    """A model folder with only its config: what precompile reads."""
    build_tiny_qwen2(1000).config.save_pretrained(tmp_path)
    return tmp_path


def test_shapes_come_from_the_models_config(tiny_config_dir):
    widths, vocab = model_shapes(tiny_config_dir)
    assert (widths, vocab) == ({64, 128}, 1000)  # hidden and MLP sizes of the tiny Qwen2


def test_nothing_to_compile_off_a_gpu_or_in_32_bits(tiny_config_dir):
    assert not precompile(tiny_config_dir, 8, torch.bfloat16, "cpu")
    assert not precompile(tiny_config_dir, 8, torch.float32, "cuda")


def compiled(*kernels) -> int:
    """How many compiled versions the Triton functions hold, over every device."""
    return sum(len(cache[0]) for k in kernels for cache in k.device_caches.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels compile for a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_steps_launches_find_their_kernels_compiled(tiny_config_dir, dtype):
    """After precompile, launches of a pack's shapes (more rows, the groups' stacked ranks of a
    rank-8 LoRA: o and down, gate and up, q, k and v; gate and up's SwiGLU) compile nothing
    more."""
    triton = load_triton()
    kernels = (triton.dropout_forward, triton.dropout_backward, triton.ce_rows_kernel)
    kernels += (triton.swiglu_forward, triton.swiglu_backward)
    for kernel in kernels:  # what earlier tests compiled in this process is forgotten
        kernel.device_caches.clear()
    assert precompile(tiny_config_dir, 8, dtype, "cuda")
    before = compiled(*kernels)
    assert before > 0
    widths, vocab = model_shapes(tiny_config_dir)
    seed = dropout.draw_seed(torch.device("cuda"))
    for width in widths:
        x = torch.randn(70, width, dtype=dtype, device="cuda")
        dropout.dropped(x, 0.1, seed)
        for ranks in (8, 16, 24):
            low = torch.randn(70, ranks, dtype=dtype, device="cuda")
            a = torch.randn(ranks, width, dtype=dtype, device="cuda")
            dropout.input_grad(low, a, 0.1, seed)
        low = torch.randn(70, 16, dtype=dtype, device="cuda")
        b_scaled = [torch.randn(width, 8, dtype=dtype, device="cuda")] * 2
        low_grad = torch.randn(70, 8, dtype=dtype, device="cuda")
        a_down = torch.randn(8, width, dtype=dtype, device="cuda")
        for deferred in (low_grad, a_down), None:
            swiglu.kernel_backward_(x, x.clone(), x.clone(), low, b_scaled, deferred)
        swiglu.kernel_forward(x, x, low, b_scaled)
    logits = torch.randn(70, vocab, dtype=dtype, device="cuda")
    ce_rows.ce_rows(logits, torch.randint(0, vocab, (70,), device="cuda"), write_grad=True)
    assert compiled(*kernels) == before
