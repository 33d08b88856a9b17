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
from typing import Any

import torch
from torch.nn.modules import module as modules

from selftune.kernels import swiglu
from selftune.kernels.lora import LoraGroup, adapter_input, group_backward

# decoder MLPs whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x))
SWIGLU_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


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
    never written (kernels.swiglu). Without dropout only: with the dropout kernel's mask drawn
    again inside the SwiGLU backward, that kernel took 790 against 386 us on an H200, more than
    the handoff saves (bench/README.md; why, not found)."""

    pending: tuple | None = None


def swiglu_mlp(module: Any) -> bool:
    """Whether `module` is one of SWIGLU_MLPS with SiLU as its activation (Liger's SwiGLU
    replaces the forward, not the class, and computes the same)."""
    config = getattr(module, "config", None)
    act = getattr(config, "hidden_act", None)
    return type(module).__name__ in SWIGLU_MLPS and act in ("silu", "swish")


def route_mlp(mlp: Any, group: LoraGroup) -> None:
    """Run `mlp`'s gate, up and activation through LoraSwiglu when autograd records (training);
    otherwise, and for adapters it cannot run or modules with hooks (PEFT's mixed-adapter
    batches pass their adapter names through hooks; LoraSwiglu never calls the projections as
    modules), the forward it had: Liger's or the class's."""
    routed = mlp.__dict__.get("_selftune_mlp")
    kept = routed[0] if routed is not None else mlp.__dict__.get("forward")
    previous = kept or type(mlp).forward.__get__(mlp)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = group.adapter()
        if args or kwargs or hooked(group) or name is None or not torch.is_grad_enabled():
            return previous(x, *args, **kwargs)
        down = getattr(mlp.down_proj, "_selftune_group", None)
        alone = down is not None and len(down.modules) == 1 and not hooked(down)
        down_name = down.adapter() if alone else None
        if down_name is None:  # down_proj its own way: it hands nothing back
            return mlp.down_proj(activation(group, x, name, None))
        handoff = Handoff()
        return down.run(activation(group, x, name, handoff), down_name, handoff)[0]

    forward._selftune_route = True
    mlp._selftune_mlp = (kept, group)
    mlp.forward = forward


def reroute_mlps(model: Any) -> None:
    """Route again the MLPs whose forward was bound anew after routing (Liger's patch, applied
    for decoding a model trained in this process), keeping the new forward as the fallback."""
    for module in model.modules():
        routed = module.__dict__.get("_selftune_mlp")
        current = module.__dict__.get("forward")
        if routed is not None and not getattr(current, "_selftune_route", False):
            del module._selftune_mlp  # route_mlp then keeps the current forward
            route_mlp(module, routed[1])


def activation(group: LoraGroup, x: torch.Tensor, name: str, handoff: Handoff | None):
    """silu(gate(x)) * up(x) for the group (gate_proj, up_proj), through LoraSwiglu."""
    weights, biases, adapters, lowrank = group.tensors(name, x.device.type)
    return LoraSwiglu.apply(x, group.rate(name), lowrank, handoff, *weights, *biases, *adapters)


def unroute_mlp(module: Any) -> None:
    """Give a routed MLP back the forward it had (Liger's, or its class's)."""
    if "_selftune_mlp" in module.__dict__:
        kept, _ = module.__dict__.pop("_selftune_mlp")
        if not getattr(module.__dict__.get("forward"), "_selftune_route", False):
            return  # bound anew since (reroute_mlps not called): that forward stays
        if kept is None:
            del module.forward
        else:
            module.forward = kept


def hooked(group: LoraGroup) -> bool:
    """Hooks that calling the projections as modules would run: their own or global ones."""
    global_hooks = (
        modules._global_forward_pre_hooks,
        modules._global_forward_hooks,
        modules._global_backward_pre_hooks,
        modules._global_backward_hooks,
    )
    if any(global_hooks):
        return True
    return any(
        m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks or m._backward_hooks
        for m in group.modules
    )
