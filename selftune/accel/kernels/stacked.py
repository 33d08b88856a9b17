"""Decode-step projections as one GEMV per shared input, LoRA's A matrices folded in.

At batch 1 a decode step is a chain of matrix-vector products, and each launch costs a few
microseconds whatever its size: q, k and v (or gate and up) are three (two) products of one
input, and an unmerged LoRA adds one small product for A and one for B per projection: many
more kernels a step than the merged model runs (bench/README.md). Here the
weights of the projections that read one input live in one buffer, the active adapter's A
rows below them, so one GEMV gives every base output and every rank-r product; then one
block-diagonal B product adds all the LoRA outputs in place. The modules keep their weights as
views of that buffer (no memory is added), so every other path reads the same numbers.

Only one-token steps without autograd (the decode step) take this path; a prompt, training and
anything unusual run the module's own forward. The A rows and B blocks are copied in at
`refresh` (before each answer), in place, so captured CUDA graphs read the current adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from selftune.accel import lora_routing as lora
from selftune.accel.lora_routing import shared_adapter

SINGLE = ("o_proj", "down_proj")  # stacked only to fold an adapter's A rows in


@dataclass
class Stack:
    """Projections of one input over one weight buffer: base rows, then `rank` A rows."""

    modules: list[Any]  # nn.Linear or PEFT LoRA Linear
    weight: torch.Tensor  # (sum of outputs + rank, in)
    bias: torch.Tensor | None
    outs: list[int]
    rank: int  # A rows the buffer holds (0 without LoRA)
    b_block: torch.Tensor | None  # (sum of outputs, rank): each s * B on its own block
    loaded: str | None = None  # the adapter whose A rows and Bs are in the buffers
    loaded_key: tuple = ()
    released: bool = False
    last_input: torch.Tensor | None = None
    outputs: list[torch.Tensor] = field(default_factory=list)
    waiting: set[int] = field(default_factory=set)

    def release(self) -> None:
        """Give the members their own forwards back and drop the buffer (the weights stay as
        they are, views of it, until a new stack copies them)."""
        for module in self.modules:
            forward = module.__dict__.get("forward")
            if getattr(forward, "_selftune_stacked", False):
                if forward._selftune_fallback is None:  # the class's own forward
                    del module.forward
                else:
                    module.forward = forward._selftune_fallback
            module.__dict__.pop("_selftune_stack", None)
        self.weight = self.weight.new_empty(0)  # the old buffer goes once its views do
        self.bias = self.b_block = None
        self.released = True
        lora.ROUTINGS[0] += 1  # graphs captured over this buffer must go

    def intact(self) -> bool:
        """Whether each member's weight is still its view of the buffer (a safe merge, a
        state-dict load with `assign` or a move to another device replaces it)."""
        if self.released:
            return False
        start = 0
        for module, out in zip(self.modules, self.outs):
            weight = base_linear(module)
            if weight is None or weight.weight.data_ptr() != self.weight[start].data_ptr():
                return False
            start += out
        return True

    def mode(self) -> str | None:
        """'lora', 'base' (adapters off, merged or absent) or None (the module's own forward)."""
        if not self.intact():
            return None
        lora_layers = [hasattr(m, "lora_A") for m in self.modules]
        if not any(lora_layers):
            return "base"
        if not all(lora_layers):  # stack_projections never mixes them; be safe all the same
            return None
        first = self.modules[0]
        if first.disable_adapters or first.merged or not first.active_adapters:
            # PEFT's forward is the base layer's alone then
            return "base" if all(m.disable_adapters or m.merged for m in self.modules) else None
        if self.loaded is not None and self.loaded_key != self.adapter_key(self.loaded):
            self.refresh()  # the adapter changed since `refresh` (an eager step notices)
        return (
            "lora"
            if self.loaded is not None and self.loaded == shared_adapter(self.modules)
            else None
        )

    def adapter_key(self, name: str) -> tuple:
        """What the copied rows depend on: the adapter weights' addresses and versions, their
        scales and the optimizer steps taken (updates through `.data` move no version)."""
        key: list = [lora.OPTIMIZER_STEPS[0]]
        for m in self.modules:
            a, b = m.lora_A[name].weight, m.lora_B[name].weight
            key += [a.data_ptr(), a._version, b.data_ptr(), b._version, float(m.scaling[name])]
        return tuple(key)

    def signature(self) -> tuple:
        """What a graph captured over this stack read: its path and its buffers' addresses."""
        if not self.intact():
            return ("own forward",)
        return (self.loaded, self.weight.data_ptr())

    def refresh(self) -> None:
        """Copy the active adapter's A rows and scaled Bs in (in place), when they fit."""
        name = shared_adapter(self.modules) if self.rank else None
        if name is not None and name == self.loaded and self.loaded_key == self.adapter_key(name):
            return  # in the buffers already (each answer asks; a copy is ~8 launches a stack)
        self.loaded = None
        if name is None or not self.intact():
            return
        a = [m.lora_A[name].weight for m in self.modules]
        if sum(w.shape[0] for w in a) != self.rank:
            return
        base = sum(self.outs)
        with torch.no_grad():
            self.weight[base:].copy_(torch.cat(a))
            self.b_block.zero_()
            row = col = 0
            for m, out, w in zip(self.modules, self.outs, a):
                b = m.lora_B[name].weight * float(m.scaling[name])
                self.b_block[row : row + out, col : col + w.shape[0]].copy_(b)
                row, col = row + out, col + w.shape[0]
        self.loaded, self.loaded_key = name, self.adapter_key(name)

    def run(self, x: torch.Tensor, mode: str) -> list[torch.Tensor]:
        y = F.linear(x, self.weight, self.bias)
        base = sum(self.outs)
        if mode == "lora":
            flat = y.view(-1, y.shape[-1])
            flat[:, :base].addmm_(flat[:, base:], self.b_block.t())
        outputs, start = [], 0
        for out in self.outs:
            outputs.append(y[..., start : start + out])
            start += out
        return outputs

    def output(self, index: int, x: torch.Tensor, forward: Any, *args: Any, **kwargs: Any):
        if x is self.last_input and index in self.waiting and not (args or kwargs):
            self.waiting.discard(index)
            out = self.outputs[index]
            if not self.waiting:
                self.last_input, self.outputs = None, []
            return out
        mode = None
        one_token = x[..., 0].numel() == 1 and x.dtype == self.weight.dtype
        if one_token and not (args or kwargs or torch.is_grad_enabled()):
            mode = self.mode()
        if mode is None:  # a prompt, training, mixed adapters: the module's own forward
            return forward(x, *args, **kwargs)
        self.last_input, self.outputs = x, self.run(x, mode)
        self.waiting = set(range(len(self.modules))) - {index}
        return self.outputs[index]


def base_linear(module: Any) -> torch.nn.Linear | None:
    base = getattr(module, "base_layer", module)
    return base if type(base) is torch.nn.Linear else None


def build(modules: list[Any]) -> Stack | None:
    """Move the members' weights into one buffer (theirs become views of it)."""
    bases = [base_linear(m) for m in modules]
    if any(b is None for b in bases):
        return None
    weights = [b.weight for b in bases]
    if len({(w.shape[1], w.dtype, w.device) for w in weights}) != 1:
        return None
    name = modules[0].active_adapters[0] if hasattr(modules[0], "lora_A") else None
    rank = 0
    if name is not None and all(name in getattr(m, "lora_A", {}) for m in modules):
        rank = sum(m.lora_A[name].weight.shape[0] for m in modules)
    for member in [*modules, *bases]:  # an older stack over these weights (the base model's)
        old = member.__dict__.get("_selftune_stack")
        if old is not None:
            old.release()
    outs = [w.shape[0] for w in weights]
    like = weights[0]
    # not inference tensors, even when built under inference mode: the weights train later
    with torch.inference_mode(False), torch.no_grad():
        weight = torch.cat([*weights, like.new_zeros(rank, like.shape[1])])
        bias = None
        if any(b.bias is not None for b in bases):
            parts = [
                b.bias if b.bias is not None else like.new_zeros(o) for b, o in zip(bases, outs)
            ]
            bias = torch.cat([*parts, like.new_zeros(rank)])
        b_block = like.new_zeros(sum(outs), rank) if rank else None
        start = 0
        for b, out in zip(bases, outs):
            b.weight.data = weight[start : start + out]
            if b.bias is not None:
                b.bias.data = bias[start : start + out]
            start += out
    return Stack(modules, weight, bias, outs, rank, b_block)
