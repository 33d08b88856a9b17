"""Routes PEFT LoRA layers through the grouped kernels: projections that share an input run as
one group (LoraGroup); a SwiGLU MLP's gate, up and activation as one node (kernels.lora_mlp).
Undone by unfuse_lora."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.modules import module as modules

from selftune.accel.kernels.lora import (
    SHARED_INPUT,
    FrozenBase,
    GroupedLora,
    compute_lowrank,
    grouped_outputs,
    unflatten,
)
from selftune.accel.kernels.lora_mlp import Handoff, LoraSwiglu

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
            # a captured training pass (accel.step_graphs) casts anew at every replay, so it sees
            # each optimizer step; the cache keeps the eager copies (decode graphs instead read
            # the no-grad copies, refreshed in place before they replay)
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
            if names == ["gate_proj", "up_proj"] and swiglu_mlp(parent):
                route_mlp(parent, group)
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

    undone = False
    for module in model.modules():
        unroute_mlp(module)
        if getattr(module, "_selftune_group", None) is not None:
            del module.forward
            del module._selftune_group
            undone = True
    ROUTINGS[0] += undone


# decoder MLPs whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x))
SWIGLU_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


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
