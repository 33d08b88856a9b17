"""A SwiGLU MLP whose gate and up projections carry LoRA, run as one autograd node.

Grouped LoRA (kernels.lora) writes gate's and up's B products and lets each base GEMM accumulate
into its own (beta = 1); Liger's SwiGLU then reads both outputs. For the 7B model's 18,944-wide
outputs that accumulation costs more than a plain GEMM (bench/README.md). Here the base GEMMs
write plain outputs and kernels.swiglu adds the rank-r products inside the activation, in the
forward and a checkpointed layer's recompute; without dropout on down_proj, its adapter part of
the activation's gradient is handed to the activation's backward too (Handoff), so its base
GEMM writes as well. Training only: decode and evaluation keep the MLP's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selftune.accel.kernels import swiglu
from selftune.accel.kernels.lora import adapter_input, group_backward


class LoraSwiglu(torch.autograd.Function):
    """silu(gate(x)) * up(x) for LoRA-adapted gate and up projections, the adapters' products
    added inside the activation (kernels.swiglu) rather than written for the base GEMMs to
    accumulate into: those write with beta = 0. Saves what GroupedLora saves, plus gate's and
    up's plain outputs (what the activation's backward needs, as Liger's SwiGLU saves its
    inputs); the backward writes their gradients over them and continues as GroupedLora's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, lowrank: tuple, handoff, *tensors):
        """The arguments as GroupedLora's, for the members (gate_proj, up_proj); `handoff`
        the Handoff that down_proj's GroupedLora fills, or None."""
        a_all, b_scaled, scales = lowrank
        weights, biases, lora_a = tensors[:2], tensors[2:4], tensors[4:6]
        dtype = a_all.dtype
        with torch.autocast(x.device.type, enabled=False):
            x2, dropped, mask, low = adapter_input(x, p, a_all)
            gate, up = (
                torch.nn.functional.linear(x2, w.to(dtype), None if b is None else b.to(dtype))
                for w, b in zip(weights, biases)
            )
            out = swiglu.forward(gate, up, low, b_scaled)
        ctx.p, ctx.k, ctx.dtype, ctx.scales = p, 2, dtype, scales
        ctx.handoff, ctx.handoff_in = None, handoff  # x's gradient its own; down_proj's part in
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.weights = weights  # frozen: kept by reference, not saved (as GroupedLora)
        ctx.save_for_backward(dropped, mask, low, a_all, *b_scaled, *lora_a, gate, up)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        gate, up = saved[-2:]
        low, b_scaled = saved[2], saved[4:6]
        with torch.autocast(gate.device.type, enabled=False):
            grad = grad_out.reshape(gate.shape).to(ctx.dtype)
            deferred = None
            if ctx.handoff_in is not None:
                deferred, ctx.handoff_in.pending = ctx.handoff_in.pending, None
            swiglu.backward_(grad, gate, up, low, b_scaled, deferred)  # gate, up := gradients
            # the kernel wrote through pointers: count the writes, so that a second backward
            # through this graph (retain_graph) fails as for any tensor modified in place
            for saved_output in (gate, up):
                torch.autograd.graph.increment_version(saved_output)
        grad_x, grads_a, grads_b = group_backward(ctx, saved, [gate, up])
        return (grad_x, None, None, None, None, None, None, None, *grads_a, *grads_b)


@dataclass
class Handoff:
    """down_proj's adapter part of its input's gradient, (low_grad, A) for low_grad @ A, handed
    from its GroupedLora backward to the LoraSwiglu backward that produced that input: added
    there as it is read, so down_proj's base GEMM writes the gradient (beta = 0) and the part is
    never written (kernels.swiglu). Without dropout only: drawing the dropout mask again inside
    the SwiGLU backward slows that kernel by more than the handoff saves (bench/README.md)."""

    pending: tuple | None = None
