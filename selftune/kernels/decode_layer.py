"""The decode step's residual adds folded into the projections before them.

Why: a decoder layer adds its attention output and its MLP output to the residual stream, each
one more kernel (and on an H100 about a microsecond of idle GPU before it in a replayed graph)
per layer and token. At batch 1, o_proj and down_proj are matrix-vector products, and cuBLAS
adds the residual as it writes the product (`addmm` with beta = 1) at no extra cost: two
kernels a layer fewer. The layer's own sequence is kept (norm, attention, norm, MLP); only the
two adds move. A projection that is not a plain linear layer (an unmerged LoRA adapter's) leaves
its add to the layer, as before.

Only the static decoder's one-token steps take this path (the same `Slot` as
kernels.decode_attention); everything else runs the layer's own forward.
"""

from __future__ import annotations

from typing import Any

import torch

from selftune.kernels import decode_attention

SUPPORTED = ("LlamaDecoderLayer", "Qwen2DecoderLayer", "MistralDecoderLayer")
NEEDED = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")


def supported(layer: Any) -> bool:
    return (
        type(layer).__name__ in SUPPORTED
        and all(hasattr(layer, name) for name in NEEDED)
        and decode_attention.supported(layer.self_attn)
        and hasattr(layer.mlp, "down_proj")
        and hasattr(layer.self_attn, "o_proj")
    )


def route(model: Any, slot: decode_attention.Slot) -> int:
    """Give each supported layer of `model` the decode forward, and its o_proj and down_proj
    the residual-adding one, reading `slot`; return how many layers took it."""
    routed = 0
    for layer in list(model.modules()):
        if supported(layer):
            install(layer, layer_forward, slot)
            install(layer.self_attn.o_proj, projection_forward, slot)
            install(layer.mlp.down_proj, projection_forward, slot)
            routed += 1
    return routed


def unroute(model: Any) -> None:
    for module in model.modules():
        current = module.__dict__.get("forward")
        if getattr(current, "_selftune_decode_layer", False):
            if current._selftune_fallback is None:
                del module.forward
            else:
                module.forward = current._selftune_fallback


def install(module: Any, make: Any, slot: decode_attention.Slot) -> None:
    previous = module.__dict__.get("forward")
    if getattr(previous, "_selftune_decode_layer", False):  # an earlier decoder's
        previous = previous._selftune_fallback

    def own(*args: Any, **kwargs: Any):
        if previous is not None:
            return previous(*args, **kwargs)
        return type(module).forward(module, *args, **kwargs)

    forward = make(module, slot, own)
    forward._selftune_decode_layer = True
    forward._selftune_fallback = previous
    module.forward = forward


def one_token_step(slot: decode_attention.Slot, hidden: torch.Tensor) -> bool:
    return (
        slot.cache is not None
        and hidden.shape[:-1] == (1, 1)
        and not torch.is_grad_enabled()
        and decode_attention.runs_on(hidden.device)
    )


def layer_forward(layer: Any, slot: decode_attention.Slot, own: Any):
    def forward(*args: Any, **kwargs: Any):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if len(args) > 1 or hidden is None or not one_token_step(slot, hidden):
            return own(*args, **kwargs)
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        try:
            slot.residual = hidden  # o_proj adds it, when it can
            out, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden), **rest)
            x = out if slot.residual is None else hidden + out
            slot.residual = x  # down_proj adds it, when it can
            out = layer.mlp(layer.post_attention_layernorm(x))
            return out if slot.residual is None else x + out
        finally:
            slot.residual = None

    return forward


def plain_weight(module: Any) -> torch.Tensor | None:
    """The weight a projection's output is `x @ weight.T` of: a bias-free linear layer, or a
    LoRA layer whose adapters are merged or off; None otherwise."""
    if hasattr(module, "lora_A"):
        lora_off = module.merged or module.disable_adapters or not module.active_adapters
        if not lora_off:
            return None
        module = module.base_layer
    if type(module) is not torch.nn.Linear or module.bias is not None:
        return None
    return module.weight


def projection_forward(module: Any, slot: decode_attention.Slot, own: Any):
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any):
        residual = slot.residual
        if residual is None or args or kwargs or x.shape[:-1] != (1, 1):
            return own(x, *args, **kwargs)
        weight = plain_weight(module)
        if weight is None or residual.shape[-1] != weight.shape[0] or x.dtype != weight.dtype:
            return own(x)
        slot.residual = None  # taken: the layer adds nothing more
        flat = torch.addmm(residual.view(1, -1), x.view(1, -1), weight.t())
        return flat.view(residual.shape)

    return forward
