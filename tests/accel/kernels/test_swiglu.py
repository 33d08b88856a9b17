"""SwiGLU with LoRA's rank-r products added inside (selftune.accel.kernels.swiglu): the Triton kernels
and the PyTorch version against the formula in float64."""

from __future__ import annotations

import pytest
import torch
from support import run_interpreted

from selftune.accel.kernels import swiglu

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels run on a GPU")


def formula(gate, up, low, b_gate, b_up):
    """silu(g) * u and its gradients by autograd, in float64, g and u the adapted outputs."""
    rank = b_gate.shape[1]
    g = (gate.double() + low[:, :rank].double() @ b_gate.double().t()).requires_grad_()
    u = (up.double() + low[:, rank:].double() @ b_up.double().t()).requires_grad_()
    return g, u, torch.nn.functional.silu(g) * u


def check_kernels(device: str, dtype: torch.dtype, kernels: bool = True) -> None:
    """Rows and columns that leave part tiles, equal and unequal ranks, a width Triton
    specialises on (divisible by 16) and one it cannot, down_proj's adapter gradient handed in
    or not; the Triton kernels (two tiles), or with `kernels` False the PyTorch version."""
    cases = ((1100, (8, 8), False), (1104, (4, 12), True), (300, (24, 24), True))
    for index, (cols, ranks, handed) in enumerate(cases):
        torch.manual_seed(cols)
        rows = 70
        gate, up, grad = (torch.randn(rows, cols).to(device, dtype) for _ in range(3))
        low = torch.randn(rows, sum(ranks)).to(device, dtype)
        b_gate, b_up = (torch.randn(cols, r).to(device, dtype) / r**0.5 for r in ranks)
        g, u, want = formula(gate, up, low, b_gate, b_up)
        tile = (32, 128, 4) if index % 2 else (16, 64, 4)
        if kernels:
            got = swiglu.kernel_forward(gate, up, low, (b_gate, b_up), tile)
        else:
            got = swiglu.forward(gate, up, low, (b_gate, b_up))
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)
        deferred, total = None, grad.double()
        if handed:  # down_proj's adapter part, low_grad @ A
            low_grad = torch.randn(rows, 8).to(device, dtype)
            a_down = torch.randn(8, cols).to(device, dtype) / 8**0.5
            deferred, total = (low_grad, a_down), total + low_grad.double() @ a_down.double()
        want.backward(total)
        if kernels:  # the gradients over the inputs
            swiglu.kernel_backward_(grad, gate, up, low, (b_gate, b_up), deferred, tile)
        else:
            swiglu.backward_(grad, gate, up, low, (b_gate, b_up), deferred)
        torch.testing.assert_close(gate.double(), g.grad, rtol=2e-2, atol=5e-2)
        torch.testing.assert_close(up.double(), u.grad, rtol=2e-2, atol=5e-2)


def test_kernels_under_the_interpreter():
    run_interpreted("test_swiglu", 'check_kernels("cpu", torch.float16)')


def test_pytorch_version_where_the_kernels_cannot_run():
    """Float32 on the CPU takes the PyTorch version; it computes the same formula."""
    check_kernels("cpu", torch.float32, kernels=False)
    half = torch.zeros(2, 16, dtype=torch.bfloat16)
    assert not swiglu.usable(half, (8, 8))  # on the CPU
    if torch.cuda.is_available():
        assert swiglu.usable(half.cuda(), (8, 8))
        assert not swiglu.usable(half.cuda(), (8, swiglu.MAX_RANK + 1))


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_kernels(dtype):
    check_kernels("cuda", dtype)
