"""LoRA input dropout in Triton (selftune.accel.kernels.dropout): the forward drops each element with
probability p and scales the rest; the backward draws the same mask again from the seed."""

from __future__ import annotations

import pytest
import torch
from support import assert_close_to_scale, build_tiny_qwen2, run_interpreted

from selftune.accel.kernels import dropout as fused_dropout

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels run on a GPU")


def gpu_lora_model(dropout: float):
    """The tiny Qwen2 with rank-4 LoRA on every Linear, in bf16 on the GPU, its adapters float32
    master weights (as training keeps them) with B drawn, so that they matter."""
    from peft import LoraConfig, get_peft_model

    model = build_tiny_qwen2(300, seed=0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear")
    model = get_peft_model(model, config).to("cuda", torch.bfloat16).train()
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            torch.nn.init.normal_(param, std=0.05)
    return model


def check_kernels(device: str, dtype: torch.dtype) -> None:
    """Rows and columns that leave part tiles (16 or 32 rows by 512 columns), ranks 8 and 24."""
    for cols in (1100, 1104):  # a width Triton specialises on (divisible by 16) and one it cannot
        check_width(device, dtype, cols)


def check_width(device: str, dtype: torch.dtype, cols: int) -> None:
    torch.manual_seed(0)
    rows, p = 70, 0.3
    x = torch.randn(rows, cols).to(device, dtype)
    seed = torch.tensor([1234], device=device)
    dropped = fused_dropout.dropped(x, p, seed)
    keep = dropped != 0  # x has no zeros
    assert abs((~keep).float().mean().item() - p) < 0.02
    torch.testing.assert_close(dropped[keep].float(), x[keep].float() / (1 - p), rtol=1e-2, atol=0)
    assert torch.equal(fused_dropout.dropped(x, p, seed), dropped)  # the seed decides the mask
    other = fused_dropout.dropped(x, p, torch.tensor([99], device=device)) != 0
    assert (other != keep).float().mean() > 0.2  # another seed, another mask
    for rank in (8, 24):
        low_grad = torch.randn(rows, rank).to(device, dtype)
        a_all = torch.randn(rank, cols).to(device, dtype)
        got = fused_dropout.input_grad(low_grad, a_all, p, seed)
        want = keep.float() * (low_grad.float() @ a_all.float()) / (1 - p)
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=3e-2)


def test_kernels_under_the_interpreter():
    run_interpreted("test_dropout", 'check_kernels("cpu", torch.float16)')


def test_kernels_only_for_16_bit_rows_on_a_gpu():
    assert not fused_dropout.usable(torch.zeros(4, 8, dtype=torch.bfloat16), 24)  # on the CPU
    if torch.cuda.is_available():
        half = torch.zeros(4, 8, dtype=torch.bfloat16, device="cuda")
        assert fused_dropout.usable(half, 24)
        assert not fused_dropout.usable(half, fused_dropout.MAX_RANK + 1)  # too wide a rank
        assert not fused_dropout.usable(torch.zeros(4, 8, device="cuda"), 24)  # float32
        assert not fused_dropout.usable(half.t().contiguous().t(), 24)  # not row-major


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_kernels(dtype):
    check_kernels("cuda", dtype)


@cuda
def test_grouped_lora_on_a_gpu_equals_plain_autograd_under_the_kernels_mask():
    """q, k and v through GroupedLora in bf16 with dropout, against PEFT's sum under the mask
    the kernel drew (the group's first draw from the generator after seeding)."""
    from selftune.accel.lora_routing import fuse_lora

    model = gpu_lora_model(dropout=0.3)
    fuse_lora(model)
    attention = model.base_model.model.model.layers[0].self_attn
    members = [attention.q_proj, attention.k_proj, attention.v_proj]
    x = torch.randn(2, 40, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def grads():
        found = [x.grad.float()] + [m.lora_A["default"].weight.grad for m in members]
        return found + [m.lora_B["default"].weight.grad for m in members]

    torch.manual_seed(5)
    fused = [m(x) for m in members]
    sum(o.float().square().sum() for o in fused).backward()
    fused_grads = [g.clone() for g in grads()]
    x.grad = None
    for m in members:
        m.zero_grad()
    torch.manual_seed(5)
    seed = fused_dropout.draw_seed(x.device)
    dropped = fused_dropout.dropped(x.detach().reshape(-1, 64), 0.3, seed).float()
    keep = (dropped != 0).float()
    reference = []
    for m in members:
        a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
        lora = (x.reshape(-1, 64).float() * keep / 0.7) @ a.t() @ b.t()
        reference.append(m.base_layer(x).float() + m.scaling["default"] * lora.view(2, 40, -1))
    sum(o.square().sum() for o in reference).backward()
    for got, want in zip(fused, reference):
        assert_close_to_scale(got.float(), want, 3e-2)
    for got, want in zip(fused_grads, grads()):
        assert_close_to_scale(got.float(), want.float(), 5e-2)
