"""Packed attention: the dense path for equal conversations and the varlen path for the rest
give each conversation its own causal attention, with gradients, and leave no copies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from selftune.accel.kernels.attention import equal_segments, varlen_attention

HEADS, KV_HEADS, DIM = 4, 2, 16


def packed_inputs(lengths, device="cpu", dtype=torch.float32, seed=0):
    """query/key/value as transformers passes them: (1, heads, tokens, dim) views of
    (1, tokens, heads, dim) projections, with the kwargs of a packed batch."""
    gen = torch.Generator().manual_seed(seed)
    tokens = sum(lengths)

    def projection(heads):
        t = torch.randn(1, tokens, heads, DIM, generator=gen).to(device, dtype)
        return t.requires_grad_()

    sources = [projection(HEADS), projection(KV_HEADS), projection(KV_HEADS)]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    kwargs = {"cu_seq_lens_q": cu.to(device), "max_length_q": max(lengths)}
    return sources, kwargs


def reference(sources, lengths, scale, grad=None):
    """Each conversation alone: float32 causal attention, key/value heads repeated. With
    `grad`, also the gradients it gives the three projections."""
    leaves = [s.detach().float().requires_grad_() for s in sources]
    q, k, v = (t[0].transpose(0, 1) for t in leaves)  # heads, tokens, dim
    groups = HEADS // KV_HEADS
    k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    outs, start = [], 0
    for n in lengths:
        part = slice(start, start + n)
        out = F.scaled_dot_product_attention(q[:, part], k[:, part], v[:, part], is_causal=True,
                                             scale=scale)  # fmt: skip
        outs.append(out.transpose(0, 1))
        start += n
    out = torch.cat(outs)[None]  # 1, tokens, heads, dim
    if grad is None:
        return out.detach()
    out.backward(grad.float())
    return out.detach(), [t.grad for t in leaves]


def attend(sources, kwargs, scale):
    views = [s.transpose(1, 2) for s in sources]
    out, _ = varlen_attention(None, *views, None, scaling=scale, **kwargs)
    return out


def test_equal_segments_only_when_every_conversation_has_the_longest_length():
    cu = torch.tensor([0, 2048, 4096, 6144])
    assert equal_segments(6144, cu, 2048) == 3
    assert equal_segments(2048, torch.tensor([0, 2048]), 2048) == 1
    assert equal_segments(6000, torch.tensor([0, 2048, 4000, 6000]), 2048) == 0
    # a rounded-up longest length (step_graphs pads it) still only matches full packs
    assert equal_segments(6144, torch.tensor([0, 2000, 4000, 6144]), 2144) == 0


def test_equal_conversations_attend_within_themselves_with_gradients():
    lengths, scale = [24, 24, 24], DIM**-0.5
    sources, kwargs = packed_inputs(lengths)
    out = attend(sources, kwargs, scale)
    assert out.shape == (1, sum(lengths), HEADS, DIM)
    grad = torch.randn_like(out)
    want, want_grads = reference(sources, lengths, scale, grad)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    out.backward(grad)
    for source, expected in zip(sources, want_grads):
        torch.testing.assert_close(source.grad, expected, atol=1e-5, rtol=1e-5)
    # a changed key moves only the later outputs of its own conversation
    with torch.no_grad():
        sources[1][0, 30] += 1.0
    moved = (attend(sources, kwargs, scale) - out).abs().amax(dim=(0, 2, 3))
    assert moved[:30].max() == 0 and moved[30:48].max() > 0 and moved[48:].max() == 0


class LargeCopies(TorchDispatchMode):
    """The operators that write a tensor the size of the query or more without computing."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        copying = ("select_backward", "clone", "copy_", "_to_copy", "zeros", "new_zeros", "cat")
        big = isinstance(out, torch.Tensor) and out.numel() >= self.numel
        if big and func.__name__.split(".")[0] in copying:
            self.seen.append(func.__name__)
        return out


def test_backward_hands_the_projections_their_gradients_without_copies():
    """The gradient of each projection comes back in its own (tokens, heads, dim) layout."""
    sources, kwargs = packed_inputs([32, 32])
    out = attend(sources, kwargs, DIM**-0.5)
    watch = LargeCopies(sources[0].numel())
    with watch:
        out.backward(torch.randn_like(out))
    assert watch.seen == []
    assert all(s.grad.is_contiguous() for s in sources)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels need a GPU")


@cuda
@pytest.mark.parametrize("lengths", [[256, 256, 256], [1000], [300, 77, 129, 1]])
def test_cuda_kernels_match_each_conversation_alone(lengths):
    """cuDNN / flash for equal conversations, varlen flash for the rest, in bf16."""
    from selftune.accel.kernels.attention import varlen_available

    assert varlen_available()
    global HEADS, KV_HEADS, DIM
    saved = HEADS, KV_HEADS, DIM
    HEADS, KV_HEADS, DIM = 28, 4, 128
    try:
        sources, kwargs = packed_inputs(lengths, "cuda", torch.bfloat16)
        out = attend(sources, kwargs, DIM**-0.5)
        grad = torch.randn_like(out)
        want, want_grads = reference(sources, lengths, DIM**-0.5, grad)
        torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
        out.backward(grad)
        for source, expected in zip(sources, want_grads):
            torch.testing.assert_close(source.grad.float(), expected, atol=3e-2, rtol=3e-2)
    finally:
        HEADS, KV_HEADS, DIM = saved
