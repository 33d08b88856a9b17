import pytest
import torch
import torch.nn.functional as F

from selftune.accel.kernels.linear_ce import linear_cross_entropy


@pytest.mark.parametrize("chunk", [3, 7, 64])
def test_chunked_equals_full_cross_entropy(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(20, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64)
    targets = torch.randint(0, 50, (20,))
    loss, correct = linear_cross_entropy(hidden, weight, targets, chunk=chunk)
    (loss * 0.5).backward()
    fast_grad = hidden.grad.clone()
    hidden.grad = None
    logits = hidden @ weight.t()
    reference = F.cross_entropy(logits, targets, reduction="sum")
    (reference * 0.5).backward()
    torch.testing.assert_close(loss.double(), reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast_grad, hidden.grad, rtol=1e-6, atol=1e-8)
    assert correct == int((logits.argmax(-1) == targets).sum())


def test_trainable_head_is_refused():
    with pytest.raises(ValueError):
        linear_cross_entropy(
            torch.randn(2, 4), torch.randn(5, 4, requires_grad=True), torch.tensor([0, 1])
        )
