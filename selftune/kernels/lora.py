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
q, k and v. With dropout 0 the result equals PEFT's (tests/kernels/test_lora.py, on the CPU).
In a SwiGLU MLP, gate and up run through kernels.lora_mlp instead while autograd records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from selftune.kernels import dropout as fused_dropout

SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
OPTIMIZER_STEPS = [0]  # steps of any torch optimizer in this process (a cache-key part)
ROUTINGS = [0]  # fuse_lora / unfuse_lora calls that changed a model: captured graphs go stale
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
    """The group's adapter half: s_i * (dropout(x) @ A_i.T) @ B_i.T (+ b_i) for the members i.

    `FrozenBase` then adds x @ W_i.T into these outputs in place, and this node's backward gives
    x its whole gradient (base and adapter), so the frozen weights are never saved. That order
    lets a checkpointed layer's recompute stop before the base GEMM of its last projection
    (down_proj): nothing is saved after this node, and torch's non-reentrant checkpoint stops
    recomputing once every saved tensor is back (`early_stop`). The adapter outputs are written
    first and each base GEMM accumulates into them (beta = 1), where adding B's product after the
    base GEMM read and wrote every output once more."""

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


@dataclass
class LoraGroup:
    """PEFT LoRA Linear layers that read the same input; their outputs for the last input are
    dropped until each member has taken its own, so the group runs once per input. The adapter is
    whichever one is active when it runs (the server switches them per request)."""

    modules: list[Any]
    last_input: torch.Tensor | None = None
    outputs: list[torch.Tensor] = field(default_factory=list)
    waiting: set[int] = field(default_factory=set)
    # compute_lowrank's results per (adapter, grad mode), reused until the weights change: under
    # no_grad they are refreshed in place (decode graphs hold their addresses), with grad anew
    # (backward may still hold the old ones)
    lowrank: dict[tuple, tuple] = field(default_factory=dict)
    lowrank_key: dict[tuple, tuple] = field(default_factory=dict)

    def adapter(self) -> str | None:
        return shared_adapter(self.modules)

    def run(self, x: torch.Tensor, name: str, handoff: Any = None) -> list:
        weights, biases, adapters, lowrank = self.tensors(name, x.device.type)
        if not torch.is_grad_enabled():  # decode: no autograd record, no dropout
            a_all, b_scaled, _ = lowrank
            return grouped_outputs(x, 0.0, a_all, b_scaled, weights, biases)
        adapted = GroupedLora.apply(
            x, self.rate(name), lowrank, handoff, *weights, *biases, *adapters
        )
        return unflatten(FrozenBase.apply(x.detach(), tuple(weights), *adapted), x)

    def tensors(self, name: str, device_type: str) -> tuple:
        """The members' base weights and biases, the adapters' float32 weights and their cast
        (compute_lowrank) for the adapter `name`."""
        weights = [m.base_layer.weight for m in self.modules]
        biases = [m.base_layer.bias for m in self.modules]
        adapters = self.adapter_weights(name)
        return weights, biases, adapters, self.current_lowrank(name, adapters, device_type)

    def rate(self, name: str) -> float:
        return dropout_rate(self.modules[0], name) if self.modules[0].training else 0.0

    def adapter_weights(self, name: str) -> list[torch.Tensor]:
        """Every member's A, then every member's B."""
        return [m.lora_A[name].weight for m in self.modules] + [
            m.lora_B[name].weight for m in self.modules
        ]

    def current_lowrank(self, name: str, adapters: list[torch.Tensor], device_type: str) -> tuple:
        """Cast and stack the adapters once per optimizer step, not once per call: the key holds
        the optimizer steps taken and each weight's address and version counter, which in-place
        updates through the tensor itself (a state-dict load, `copy_`) move on."""
        dtype = self.modules[0].base_layer.weight.dtype  # the compute dtype: bf16 on a GPU
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        scales = tuple(float(m.scaling[name]) for m in self.modules)
        key = (dtype, scales, OPTIMIZER_STEPS[0], *((t.data_ptr(), t._version) for t in adapters))
        slot = (name, torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        k = len(self.modules)
        if slot[1] and device_type == "cuda" and torch.cuda.is_current_stream_capturing():
            # a captured training pass (selftune.step_graphs) casts anew at every replay, so it
            # sees each optimizer step; the cache keeps the eager copies (decode graphs instead
            # read the no-grad copies, refreshed in place before they replay)
            return compute_lowrank(adapters[:k], adapters[k:], scales, dtype)
        if self.lowrank_key.get(slot) != key:
            into = None if slot[1] else self.lowrank.get(slot)
            self.lowrank[slot] = compute_lowrank(adapters[:k], adapters[k:], scales, dtype, into)
            self.lowrank_key[slot] = key
        return self.lowrank[slot]

    def signature(self) -> tuple:
        """The addresses and shapes of the no-grad adapters a decode graph reads."""
        name = self.adapter()
        cached = self.lowrank.get((name, False, True)) if name is not None else None
        if cached is None:
            return (name,)
        return (name, *((t.data_ptr(), tuple(t.shape)) for t in (cached[0], *cached[1])))

    def refresh(self) -> None:
        """Bring the no-grad adapters up to date: before a captured decode graph replays, since
        a replay runs no Python that would notice new adapter weights."""
        name = self.adapter()
        if name is None:
            return
        adapters = self.adapter_weights(name)
        with torch.no_grad():
            self.current_lowrank(name, adapters, adapters[0].device.type)

    def output(self, index: int, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        module = self.modules[index]
        if args or kwargs or x is not self.last_input or index not in self.waiting:
            name = None if args or kwargs else self.adapter()
            if name is None:  # mixed-adapter batches, merged, disabled or DoRA adapters
                return type(module).forward(module, x, *args, **kwargs)
            self.last_input, self.outputs = x, self.run(x, name)
            self.waiting = set(range(len(self.modules)))
        self.waiting.discard(index)
        out = self.outputs[index]
        if not self.waiting:
            self.last_input, self.outputs = None, []
        return out


def shared_adapter(modules: list[Any]) -> str | None:
    """The one active adapter when every module runs it plainly at one dropout rate."""
    first = modules[0]
    if first.disable_adapters or len(first.active_adapters) != 1:
        return None
    (name,) = first.active_adapters
    for m in modules:
        if m.merged or m.disable_adapters or plain_lora(m) != name:
            return None
    if len({dropout_rate(m, name) for m in modules}) != 1:
        return None
    return name


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
    from selftune.kernels import lora_mlp

    watch_optimizers()
    routed = 0
    for parent in model.modules():
        children = {name: m for name, m in parent.named_children() if plain_lora(m)}
        groups = [[n for n in names if n in children] for names in SHARED_INPUT]
        groups = [g for g in groups if len(g) > 1]
        grouped = {n for g in groups for n in g}
        groups += [[n] for n in children if n not in grouped]
        for names in groups:
            group = LoraGroup([children[n] for n in names])
            for index, name in enumerate(names):
                children[name].forward = _bound(group, index)
                children[name]._selftune_group = group
                routed += 1
            if names == ["gate_proj", "up_proj"] and lora_mlp.swiglu_mlp(parent):
                lora_mlp.route_mlp(parent, group)
    ROUTINGS[0] += bool(routed)
    return routed


def lora_groups(model: Any) -> list[LoraGroup]:
    """The model's routed groups, each once."""
    groups: dict[int, LoraGroup] = {}
    for module in model.modules():
        group = getattr(module, "_selftune_group", None)
        if group is not None:
            groups[id(group)] = group
    return list(groups.values())


def _bound(group: LoraGroup, index: int):
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return group.output(index, x, *args, **kwargs)

    return forward


def unfuse_lora(model: Any) -> None:
    """Give every routed layer back its PEFT forward."""
    from selftune.kernels import lora_mlp

    undone = False
    for module in model.modules():
        lora_mlp.unroute_mlp(module)
        if getattr(module, "_selftune_group", None) is not None:
            del module.forward
            del module._selftune_group
            undone = True
    ROUTINGS[0] += undone
