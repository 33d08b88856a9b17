"""LoRA projections that read one input, computed as one unit in the base weights' dtype.

PEFT runs each adapted Linear alone: the input is cast to the adapters' float32, dropped out and
multiplied by A and B per module, so q, k and v (or gate and up) each keep their own float32
copy of the same input for backward, and each costs a dozen small launches. Here the projections
that share an input form a group: one dropout mask and one GEMM for all their A matrices
(stacked), each B's product written first and its base GEMM accumulated into it, all in the
compute dtype (bf16 on a GPU), and only the dropped-out input (once) and the rank-r products
kept for backward; the frozen base weights are not saved (see GroupedLora). The float32
adapter weights stay the optimizer's master copy: their gradients come back in float32.

One mask per group, where PEFT draws one per module: the same dropout rate, correlated across
q, k and v. With dropout 0 the result equals PEFT's (tests/accel/kernels/test_lora.py, on the CPU).
In a SwiGLU MLP, gate and up run through kernels.lora_mlp instead while autograd records.
"""

from __future__ import annotations

import torch

from selftune.accel.kernels import dropout as fused_dropout

SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class GroupedLora(torch.autograd.Function):
    """The group's adapter half: s_i * (dropout(x) @ A_i.T) @ B_i.T (+ b_i) for the members i.

    `FrozenBase` then adds x @ W_i.T into these outputs in place, and this node's backward gives
    x its whole gradient (base and adapter), so the frozen weights are never saved. That order
    lets a checkpointed layer's recompute stop before the base GEMM of its last projection
    (down_proj): nothing is saved after this node, and torch's non-reentrant checkpoint stops
    recomputing once every saved tensor is back (`early_stop`). The adapter outputs are written
    first and each base GEMM accumulates into them (beta = 1), where adding B's product after the
    base GEMM would read and write every output once more."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, lowrank: tuple, handoff, *tensors):
        """`lowrank`: (stacked A, scaled Bs, scales) in the compute dtype (compute_lowrank);
        `handoff`: a lora_mlp.Handoff when x comes from LoraSwiglu, else None; `tensors`: the
        members' base weights, biases, then their float32 A (for the dtypes of their
        gradients)."""
        a_all, b_scaled, scales = lowrank
        k = len(b_scaled)
        weights, biases, lora_a = tensors[:k], tensors[k : 2 * k], tensors[2 * k : 3 * k]
        dtype = a_all.dtype
        outputs, dropped, mask, low = adapter_outputs(x, p, a_all, b_scaled, biases)
        ctx.p, ctx.k, ctx.dtype = p, k, dtype
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.weights = weights  # frozen: kept by reference, not saved (see the class docstring)
        ctx.save_for_backward(dropped, mask, low, a_all, *b_scaled, *lora_a)
        ctx.scales, ctx.handoff = scales, handoff
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        k, saved = ctx.k, ctx.saved_tensors
        tokens = saved[0].shape[0]
        g2 = [
            torch.zeros(tokens, w.shape[0], dtype=ctx.dtype, device=saved[0].device)
            if g is None
            else g.reshape(tokens, -1).to(ctx.dtype)
            for g, w in zip(grads, ctx.weights)
        ]
        grad_x, grads_a, grads_b = group_backward(ctx, saved, g2)
        return (grad_x, None, None, None, *([None] * (2 * k)), *grads_a, *grads_b)


def group_backward(ctx, saved: tuple, g2: list[torch.Tensor]) -> tuple:
    """x's whole gradient (base and adapter) and the adapters' float32 gradients, from the
    members' output gradients `g2` ((tokens, out) each, compute dtype) and what the forward
    saved first: the dropped input, its mask, the rank-r products, A stacked, the scaled Bs and
    the float32 As."""
    k, dtype, weights = ctx.k, ctx.dtype, ctx.weights
    dropped, mask, low, a_all = saved[:4]
    b_scaled, lora_a = saved[4 : 4 + k], saved[4 + k : 4 + 2 * k]
    with torch.autocast(dropped.device.type, enabled=False):
        grad_low = torch.cat([g @ b for g, b in zip(g2, b_scaled)], dim=1)
        grad_x = None
        if ctx.needs_input_grad[0]:
            handoff = ctx.handoff
            if handoff is not None and mask is None:  # LoraSwiglu's backward adds the adapter's
                handoff.pending = (grad_low, a_all)  # part: the base GEMM writes (beta = 0)
            else:  # the adapter's part first, each base GEMM accumulating into it (beta = 1)
                grad_x = fused_dropout.lora_input_grad(grad_low, a_all, ctx.p, mask)
            for g, weight in zip(g2, weights):
                if grad_x is None:
                    grad_x = g @ weight.to(dtype)
                else:
                    grad_x.addmm_(g, weight.to(dtype))
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        grad_a = (grad_low.t() @ dropped).split([a.shape[0] for a in lora_a])
        grads_a = [g.to(a.dtype) for g, a in zip(grad_a, lora_a)]
        grads_b, start = [], 0
        for g, a, s in zip(g2, lora_a, ctx.scales):
            rank = a.shape[0]
            grads_b.append((g.t() @ low[:, start : start + rank]).float().mul_(s))
            start += rank
    return grad_x, grads_a, grads_b


class FrozenBase(torch.autograd.Function):
    """outputs_i += x @ W_i.T in place, for GroupedLora's outputs. Saves nothing and gives x no
    gradient here: GroupedLora's backward includes the base weights' part of it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weights: tuple, *outputs: torch.Tensor):
        add_base(x, weights, outputs)
        ctx.mark_dirty(*outputs)
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *grads)


def adapter_outputs(x, p: float, a_all, b_scaled, biases) -> tuple:
    """Each member's adapter output (its bias included), and what backward needs: the
    dropped-out input, its mask (None without dropout; on a GPU the Triton kernels' one-element
    int64 seed instead of a bool mask: kernels.dropout) and the rank-r products."""
    dtype = a_all.dtype
    with torch.autocast(x.device.type, enabled=False):
        _, dropped, mask, low = adapter_input(x, p, a_all)
        outputs, start = [], 0
        for bias, b in zip(biases, b_scaled):
            part = low[:, start : start + b.shape[1]]
            if bias is None:
                out = part @ b.t()
            else:
                out = torch.addmm(bias.to(dtype), part, b.t())
            start += b.shape[1]
            outputs.append(out)  # (tokens, out features): not a view, FrozenBase adds into it
    return outputs, dropped, mask, low


def adapter_input(x: torch.Tensor, p: float, a_all: torch.Tensor) -> tuple:
    """x as rows in the compute dtype, those rows dropped out, the mask (None without dropout;
    on a GPU a one-element seed that the Triton backward draws the mask from again:
    kernels.dropout) and the rank-r products (tokens, sum of ranks). Autocast off."""
    x2 = x.reshape(-1, x.shape[-1]).to(a_all.dtype)
    dropped, mask = x2, None
    if p > 0 and fused_dropout.usable(x2, a_all.shape[0]):
        mask = fused_dropout.draw_seed(x2.device)
        dropped = fused_dropout.dropped(x2, p, mask)
    elif p > 0:
        dropped, mask = torch.native_dropout(x2, p, True)
    return x2, dropped, mask, dropped @ a_all.t()


def add_base(x, weights, outputs) -> None:
    """outputs_i += x @ W_i.T, each base GEMM accumulating into its output (beta = 1)."""
    with torch.autocast(x.device.type, enabled=False):
        dtype = outputs[0].dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        for weight, out in zip(weights, outputs):
            out.addmm_(x2, weight.to(dtype).t())


def grouped_outputs(x, p: float, a_all, b_scaled, weights, biases) -> list:
    """The group's outputs without autograd (decode): the adapter halves, then the base GEMMs
    accumulated into them."""
    outputs = adapter_outputs(x, p, a_all, b_scaled, biases)[0]
    add_base(x, weights, outputs)
    return unflatten(outputs, x)


def unflatten(outputs, x: torch.Tensor) -> list:
    return [out.view(*x.shape[:-1], out.shape[-1]) for out in outputs]


def compute_lowrank(lora_a, lora_b, scales, dtype, into: tuple | None = None) -> tuple:
    """The adapters as the kernel uses them: A stacked, each B times its scale, in `dtype`;
    written into `into` (an earlier result of the same shapes) when given, so that CUDA graphs
    captured over those tensors read the new values."""
    with torch.no_grad():
        a_all = torch.cat([a.to(dtype) for a in lora_a])
        b_scaled = [(b * s).to(dtype) for b, s in zip(lora_b, scales)]
        if into is not None and same_layout((a_all, *b_scaled), (into[0], *into[1])):
            into[0].copy_(a_all)
            for old, new in zip(into[1], b_scaled):
                old.copy_(new)
            return into[0], into[1], scales
    return a_all, b_scaled, scales


def same_layout(new: tuple, old: tuple) -> bool:
    return len(new) == len(old) and all(
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device for a, b in zip(new, old)
    )
