"""The one-kernel cross-entropy of a logits chunk: the loss, argmax hits and in-place gradient
of plain PyTorch, rows of -100 left out, ties broken as torch.argmax breaks them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support import run_interpreted

from selftune.accel.kernels import ce_rows
from selftune.accel.kernels.linear_ce import linear_cross_entropy


def expected(logits: torch.Tensor, targets: torch.Tensor):
    """float32 loss per row, argmax hits and softmax - one_hot, zero where the target is -100."""
    ref = logits.float()
    valid = targets != -100
    safe = targets.clamp(min=0)
    loss = F.cross_entropy(ref, safe, reduction="none") * valid
    hits = (ref.argmax(-1) == targets).int()
    grad = ref.softmax(-1) - F.one_hot(safe, ref.shape[1]).float()
    return loss, hits, grad * valid[:, None]


def tricky_chunk(dtype, device, vocab=5000):
    """Rows over more than one block of the kernel, a tie between blocks, ignored rows."""
    torch.manual_seed(0)
    logits = (torch.randn(6, vocab) * 3).to(dtype)
    logits[2, 17] = logits[2, 4500] = logits[2].max() + 1  # first index wins: 17
    logits[5, 4999] = logits[5].max() + 2  # the last entry, in the part block
    targets = torch.tensor([3, 4500, 17, -100, 12, 4999])
    return logits.to(device), targets.to(device)


def check_kernel(device: str, dtype: torch.dtype) -> None:
    logits, targets = tricky_chunk(dtype, device)
    loss, hits, grad = expected(logits, targets)
    chunk = logits.clone()
    got_loss, got_hits = ce_rows.ce_rows(chunk, targets, write_grad=True)
    torch.testing.assert_close(got_loss.cpu(), loss.cpu(), atol=1e-4, rtol=1e-4)
    assert got_hits.tolist() == hits.tolist() == [0, 0, 1, 0, 0, 1]
    torch.testing.assert_close(chunk.float(), grad, atol=2e-3, rtol=2e-2)
    assert chunk[3].abs().max() == 0  # an ignored row has no gradient
    untouched = logits.clone()
    ce_rows.ce_rows(untouched, targets, write_grad=False)
    assert torch.equal(untouched, logits)


def test_kernel_under_the_interpreter():
    run_interpreted("test_ce_rows", 'check_kernel("cpu", torch.float16)')


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel runs on a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_kernel(dtype):
    check_kernel("cuda", dtype)


def test_kernel_only_where_it_can_run():
    assert not ce_rows.usable(torch.zeros(2, 8, dtype=torch.bfloat16))  # on the CPU
    if torch.cuda.is_available():
        assert not ce_rows.usable(torch.zeros(2, 8, device="cuda"))  # float32
        assert not ce_rows.usable(torch.zeros(8, 2, dtype=torch.bfloat16, device="cuda").t())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel runs on a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_loss_through_the_kernel_equals_the_pytorch_path(dtype, monkeypatch):
    torch.manual_seed(0)
    hidden = torch.randn(700, 64, device="cuda", dtype=dtype, requires_grad=True)
    weight = torch.randn(9000, 64, device="cuda", dtype=dtype) / 8
    targets = torch.randint(0, 9000, (700,), device="cuda")
    targets[::7] = -100
    assert ce_rows.usable(hidden.detach() @ weight.t())

    def run():
        loss, correct = linear_cross_entropy(hidden, weight, targets, chunk=256)
        loss.backward()
        grad, hidden.grad = hidden.grad.clone(), None
        return loss, correct, grad

    fused = run()
    monkeypatch.setattr(ce_rows, "usable", lambda logits: False)
    plain = run()
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-4, atol=1e-3)
    assert int(fused[1]) == int(plain[1])
    torch.testing.assert_close(fused[2].float(), plain[2].float(), rtol=2e-2, atol=2e-2)
