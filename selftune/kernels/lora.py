"""LoRA projections that read one input, computed as one unit in the base weights' dtype.

PEFT runs each adapted Linear alone: the input is cast to the adapters' float32, dropped out and
multiplied by A and B per module, so q, k and v (or gate and up) each keep their own float32
copy of the same input for backward, and each costs a dozen small launches. Here the projections
that share an input form a group: one dropout mask and one GEMM for all their A matrices
(stacked), each B added into its base output in place, all in the compute dtype (bf16 on a GPU),
and only the dropped-out input (once) and the rank-r products kept for backward. The float32
adapter weights stay the optimizer's master copy: their gradients come back in float32.

One mask per group, where PEFT draws one per module: the same dropout rate, correlated across
q, k and v. With dropout 0 the result equals PEFT's (tests/kernels/test_lora.py, on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
OPTIMIZER_STEPS = [0]  # steps of any torch optimizer in this process (a cache-key part)
_step_hook: Any = None


def count_optimizer_step(*_: Any) -> None:
    OPTIMIZER_STEPS[0] += 1


def watch_optimizers() -> None:
    """Count every optimizer step, so the cast adapters are refreshed even after an update
    through `.data`, which leaves the version counters alone."""
    global _step_hook
    if _step_hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _step_hook = register_optimizer_step_post_hook(count_optimizer_step)


class GroupedLora(torch.autograd.Function):
    """outputs_i = x @ W_i.T + b_i + s_i * (dropout(x) @ A_i.T) @ B_i.T for the members i."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, lowrank: tuple, *tensors):
        """`lowrank`: (stacked A, scaled Bs, scales) in the compute dtype (compute_lowrank)."""
        a_all, b_scaled, scales = lowrank
        k = len(b_scaled)
        weights, biases, lora_a = tensors[:k], tensors[k : 2 * k], tensors[2 * k : 3 * k]
        dtype = a_all.dtype
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            mask = None
            dropped = x2
            if p > 0:
                dropped, mask = torch.native_dropout(x2, p, True)
            low = dropped @ a_all.t()  # (tokens, sum of ranks)
            outputs, start = [], 0
            for weight, bias, b in zip(weights, biases, b_scaled):
                out = F.linear(x2, weight.to(dtype), None if bias is None else bias.to(dtype))
                out.addmm_(low[:, start : start + b.shape[1]], b.t())
                start += b.shape[1]
                outputs.append(out.view(*x.shape[:-1], out.shape[-1]))
        ctx.p, ctx.k, ctx.dtype = p, k, dtype
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.save_for_backward(dropped, mask, low, a_all, *weights, *b_scaled, *lora_a)
        ctx.scales = scales
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        k, dtype = ctx.k, ctx.dtype
        saved = ctx.saved_tensors
        dropped, mask, low, a_all = saved[:4]
        weights, b_scaled, lora_a = saved[4 : 4 + k], saved[4 + k : 4 + 2 * k], saved[4 + 2 * k :]
        tokens = dropped.shape[0]
        with torch.autocast(dropped.device.type, enabled=False):
            g2 = [
                torch.zeros(tokens, w.shape[0], dtype=dtype, device=dropped.device)
                if g is None
                else g.reshape(tokens, -1).to(dtype)
                for g, w in zip(grads, weights)
            ]
            grad_low = torch.cat([g @ b for g, b in zip(g2, b_scaled)], dim=1)
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = g2[0] @ weights[0].to(dtype)
                for g, weight in zip(g2[1:], weights[1:]):
                    grad_x.addmm_(g, weight.to(dtype))
                through_a = grad_low @ a_all
                if mask is None:
                    grad_x.add_(through_a)
                else:
                    grad_x.add_(through_a.mul_(mask), alpha=1.0 / (1.0 - ctx.p))
                grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
            grad_a = (grad_low.t() @ dropped).split([a.shape[0] for a in lora_a])
            grads_a = [g.to(a.dtype) for g, a in zip(grad_a, lora_a)]
            grads_b, start = [], 0
            for g, a, s in zip(g2, lora_a, ctx.scales):
                rank = a.shape[0]
                grads_b.append((g.t() @ low[:, start : start + rank]).float().mul_(s))
                start += rank
        return (grad_x, None, None, *([None] * (2 * k)), *grads_a, *grads_b)


def compute_lowrank(lora_a, lora_b, scales, dtype) -> tuple:
    """The adapters as the kernel uses them: A stacked, each B times its scale, in `dtype`."""
    with torch.no_grad():
        a_all = torch.cat([a.to(dtype) for a in lora_a])
        b_scaled = [(b * s).to(dtype) for b, s in zip(lora_b, scales)]
    return a_all, b_scaled, scales


@dataclass
class LoraGroup:
    """PEFT LoRA Linear layers that read the same input; their outputs for the last input are
    kept until each member has taken its own, so the group runs once per input."""

    modules: list[Any]
    adapter: str
    dropout: float
    last_input: torch.Tensor | None = None
    outputs: list[torch.Tensor] = field(default_factory=list)
    waiting: set[int] = field(default_factory=set)
    lowrank: tuple | None = None  # compute_lowrank's result, reused until the weights change
    lowrank_key: tuple = ()

    def usable(self) -> bool:
        return all(
            not m.disable_adapters and not m.merged and m.active_adapters == [self.adapter]
            for m in self.modules
        )

    def run(self, x: torch.Tensor) -> list[torch.Tensor]:
        name = self.adapter
        training = self.modules[0].training and torch.is_grad_enabled()
        tensors = [m.base_layer.weight for m in self.modules]
        tensors += [m.base_layer.bias for m in self.modules]
        tensors += [m.lora_A[name].weight for m in self.modules]
        tensors += [m.lora_B[name].weight for m in self.modules]
        lowrank = self.current_lowrank(tensors[2 * len(self.modules) :], x)
        p = self.dropout if training else 0.0
        return list(GroupedLora.apply(x, p, lowrank, *tensors))

    def current_lowrank(self, adapters: list[torch.Tensor], x: torch.Tensor) -> tuple:
        """Cast and stack the adapters once per optimizer step, not once per call: the key holds
        the optimizer steps taken and each weight's address and version counter, which in-place
        updates through the tensor itself (a state-dict load, `copy_`) move on."""
        dtype = self.modules[0].base_layer.weight.dtype  # the compute dtype: bf16 on a GPU
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        scales = tuple(float(m.scaling[self.adapter]) for m in self.modules)
        key = (dtype, scales, OPTIMIZER_STEPS[0], *((t.data_ptr(), t._version) for t in adapters))
        if self.lowrank is None or key != self.lowrank_key:
            k = len(self.modules)
            self.lowrank = compute_lowrank(adapters[:k], adapters[k:], scales, dtype)
            self.lowrank_key = key
        return self.lowrank

    def output(self, index: int, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        module = self.modules[index]
        if args or kwargs or not self.usable():  # mixed-adapter batches, merged or disabled
            return type(module).forward(module, x, *args, **kwargs)
        if x is not self.last_input or index not in self.waiting:
            self.last_input, self.outputs = x, self.run(x)
            self.waiting = set(range(len(self.modules)))
        self.waiting.discard(index)
        out = self.outputs[index]
        if not self.waiting:
            self.last_input, self.outputs = None, []
        return out


def plain_lora(module: Any) -> str | None:
    """The adapter name when `module` is a PEFT LoRA Linear this kernel can run, else None."""
    if not hasattr(module, "lora_A") or type(module.base_layer) is not torch.nn.Linear:
        return None
    if len(module.active_adapters) != 1 or getattr(module, "fan_in_fan_out", False):
        return None
    (name,) = module.active_adapters
    if name not in module.lora_A or name in getattr(module, "lora_variant", {}):
        return None  # DoRA and other variants keep PEFT's forward
    if getattr(module, "lora_bias", {}).get(name, False):
        return None
    base = module.base_layer
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    return name


def dropout_rate(module: Any, adapter: str) -> float:
    dropout = module.lora_dropout[adapter]
    return float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0


def fuse_lora(model: Any) -> int:
    """Route every plain LoRA Linear of `model` through GroupedLora, grouping the projections
    that share an input; return the number of layers routed. `unfuse_lora` undoes it."""
    watch_optimizers()
    routed = 0
    for parent in model.modules():
        children = {name: m for name, m in parent.named_children() if plain_lora(m)}
        groups: list[list[str]] = []
        for names in SHARED_INPUT:
            present = [n for n in names if n in children]
            if len(present) > 1 and len({plain_lora(children[n]) for n in present}) == 1:
                rates = {dropout_rate(children[n], plain_lora(children[n])) for n in present}
                if len(rates) == 1:
                    groups.append(present)
        grouped = {n for g in groups for n in g}
        groups += [[n] for n in children if n not in grouped]
        for names in groups:
            members = [children[n] for n in names]
            adapter = plain_lora(members[0])
            group = LoraGroup(members, adapter, dropout_rate(members[0], adapter))
            for index, member in enumerate(members):
                member.forward = _bound(group, index)
                member._selftune_group = group
                routed += 1
    return routed


def _bound(group: LoraGroup, index: int):
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return group.output(index, x, *args, **kwargs)

    return forward


def unfuse_lora(model: Any) -> None:
    """Give every routed layer back its PEFT forward."""
    for module in model.modules():
        if getattr(module, "_selftune_group", None) is not None:
            del module.forward
            del module._selftune_group
