"""Routes a model's modules through the one-token decode kernels: stacked projections
(kernels.stacked) and the fused attention step (kernels.decode_attention). Each routed forward
keeps the one it replaced, to fall back on and to restore."""

from __future__ import annotations

import logging
from typing import Any

import torch

from selftune.accel.kernels import decode_attention
from selftune.accel.kernels.decode_attention import Slot
from selftune.accel.kernels.lora import SHARED_INPUT
from selftune.accel.kernels.stacked import SINGLE, Stack, build

log = logging.getLogger(__name__)


def route_attention(model: Any, slot: Slot) -> int:
    """Give every supported attention module of `model` the fused one-token forward, reading
    `slot`; return how many took it. Replaces an earlier decoder's routing."""
    routed = 0
    for module in model.modules():
        if decode_attention.supported(module):
            current = module.__dict__.get("forward")
            if getattr(current, "_selftune_decode_attention", False):
                current = current._selftune_fallback
            module.forward = _attention_forward(module, slot, current)
            routed += 1
    return routed


def unroute_attention(model: Any) -> None:
    """Give the attention modules back the forwards they had before `route_attention`."""
    for module in model.modules():
        current = module.__dict__.get("forward")
        if getattr(current, "_selftune_decode_attention", False):
            if current._selftune_fallback is None:
                del module.forward
            else:
                module.forward = current._selftune_fallback


def _attention_forward(module: Any, slot: Slot, previous: Any):
    def own(*args: Any, **kwargs: Any):
        if previous is not None:
            return previous(*args, **kwargs)
        return type(module).forward(module, *args, **kwargs)

    def forward(*args: Any, **kwargs: Any):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        embeddings = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        if (
            slot.cache is None
            or slot.failed
            or embeddings is None
            or hidden.shape[:-1] != (1, 1)
            or torch.is_grad_enabled()
            or not decode_attention.runs_on(hidden.device)
        ):
            return own(*args, **kwargs)
        layers = getattr(slot.cache, "layers", [])
        if module.layer_idx >= len(layers):
            return own(*args, **kwargs)
        q, k, v = module.q_proj(hidden), module.k_proj(hidden), module.v_proj(hidden)
        cos, sin = embeddings
        try:
            out = decode_attention.attend(
                q, k, v, cos, sin, layers[module.layer_idx], slot.position, module.scaling,
                module.head_dim,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001  # e.g. a kernel that fails to compile
            if hidden.is_cuda and torch.cuda.is_current_stream_capturing():
                raise  # the decoder drops this capture and steps eagerly
            log.warning("decode: attention kernels failed (%s); transformers' attention", exc)
            slot.failed = True
            out = None
        if out is None:
            return own(*args, **kwargs)
        return module.o_proj(out), None

    forward._selftune_decode_attention = True
    forward._selftune_fallback = previous
    return forward


def stack_projections(model: Any) -> list[Stack]:
    """Stack the projections of every layer that share an input (and, with LoRA, each single
    one) for one-token decode steps; return the stacks. The weights stay parameters (views):
    they train, merge and save as before (tests/accel/kernels/test_stacked.py)."""
    stacks: list[Stack] = []
    for parent in model.modules():
        children = dict(parent.named_children())
        names = []
        for group in SHARED_INPUT:  # LoRA layers and plain ones apart (q/v adapted, k not)
            present = [n for n in group if n in children]
            adapted = [n for n in present if hasattr(children[n], "lora_A")]
            plain = [n for n in present if n not in adapted]
            names += [g for g in (adapted, plain) if len(g) > 1 or (g and g is adapted)]
        names += [[n] for n in SINGLE if n in children and hasattr(children[n], "lora_A")]
        for group in names:
            modules = [children[n] for n in group]
            owners = {id(m.__dict__.get("_selftune_stack")) for m in modules}
            stack = modules[0].__dict__.get("_selftune_stack")
            if len(owners) == 1 and stack is not None:  # stacked already (another decoder)
                stacks.append(stack)
                continue
            stack = build(modules)
            if stack is not None:
                for m in modules:
                    m._selftune_stack = stack
                stacks.append(stack)
    return stacks


def route_stacks(stacks: list[Stack]) -> None:
    """Install the stacked forward over whatever forward each member has now (PEFT's, or
    grouped LoRA's), which it falls back to."""
    for stack in stacks:
        if stack.released:
            continue
        for index, module in enumerate(stack.modules):
            current = module.__dict__.get("forward")
            if getattr(current, "_selftune_stacked", False):
                continue
            module.forward = _stacked_forward(stack, index, current)


def _stacked_forward(stack: Stack, index: int, previous: Any):
    module = stack.modules[index]

    def fallback(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return type(module).forward(module, x, *args, **kwargs)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return stack.output(index, x, previous or fallback, *args, **kwargs)

    forward._selftune_stacked = True
    forward._selftune_fallback = previous
    return forward
