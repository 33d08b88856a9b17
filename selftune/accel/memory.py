"""Memory planning for training on a GPU: gradient checkpointing on only as many decoder layers
as the free memory needs, since recomputing a layer costs a third of its step."""

from __future__ import annotations

import math
from typing import Any


def decoder_layers(model: Any) -> list[Any]:
    decoder = model.get_decoder()
    return list(getattr(decoder, "layers", []))


def enable_checkpointing(model: Any) -> None:
    """Checkpoint every decoder layer (non-reentrant). transformers 5.25 renamed
    `gradient_checkpointing_enable`, whose old name warns until v6 removes it."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def set_checkpointing(model: Any, layers: int | None) -> None:
    """Checkpoint the first `layers` decoder layers (all when None, none when 0)."""
    all_layers = decoder_layers(model)
    if layers == 0 or not all_layers:
        return
    enable_checkpointing(model)
    if layers is not None:
        for index, layer in enumerate(all_layers):
            if hasattr(layer, "gradient_checkpointing"):
                layer.gradient_checkpointing = index < layers


GIB = 2**30


MARGIN = 2 * GIB  # kept free for the allocator, the optimizer and the output-layer chunks


def activation_bytes(config: Any) -> tuple[int, int]:
    """Bytes one token keeps per decoder layer for backward with grouped LoRA: (without, with
    checkpointing). About 20 x hidden + 8 x intermediate, fitted to the peak memory of the 7B
    model's unchecked training passes (bench/README.md); a checkpointed layer keeps its input
    alone."""
    hidden = int(config.hidden_size)
    intermediate = int(getattr(config, "intermediate_size", 4 * hidden) or 4 * hidden)
    return 20 * hidden + 8 * intermediate, 2 * hidden


def memory_is_modelled(model: Any) -> bool:
    """activation_bytes holds for frozen models trained through grouped LoRA whose loss never
    makes full logits; full fine-tunes (gradients, optimizer state), PEFT's own LoRA (float32
    copies) and soft-capped or scaled heads are not modelled and keep every layer checkpointed."""
    config = model.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    grouped = any(hasattr(m, "_selftune_group") for m in model.modules())
    return grouped and all("lora_" in n for n in trainable)


def auto_checkpoint_layers(model: Any, max_tokens: int, free_bytes: int) -> int | None:
    """The fewest decoder layers to checkpoint so that a micro-batch of `max_tokens` fits in
    `free_bytes`: 0 for none, None for all. One layer's worth more is kept free for backward's
    working set (the layer being recomputed, its gradients)."""
    layers = len(decoder_layers(model))
    plain, checked = activation_bytes(model.config)
    room = free_bytes - MARGIN
    need_unchecked = plain * (layers + 1) * max_tokens
    if layers == 0 or need_unchecked <= room:
        return 0
    saved_per_layer = (plain - checked) * max_tokens
    needed = math.ceil((need_unchecked - room) / saved_per_layer)
    return None if needed >= layers else needed


def choose_checkpointing(
    model: Any, wanted: bool | None, device: str, max_tokens: int, graph_tokens: int = 0
) -> tuple[int | None, str]:
    """Resolve --gradient_checkpointing: true = every layer, false = none, unset = off on CPU
    and on CUDA as many layers as the free memory needs (every layer where memory_is_modelled
    says no) for a pass of `max_tokens` while a CUDA graph's pool holds the activations of one
    of `graph_tokens` (selftune.accel.step_graphs). Returns (layers, a line for the log)."""
    if wanted is None and device.startswith("cuda") and not memory_is_modelled(model):
        wanted = True
    if wanted is not None or not device.startswith("cuda"):
        layers = None if wanted else 0
        return layers, "gradient checkpointing " + ("on" if wanted else "off")
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    layers = auto_checkpoint_layers(model, max_tokens + graph_tokens, free)
    total = len(decoder_layers(model))
    shown = total if layers is None else layers
    twice = f", room for a CUDA graph of {graph_tokens} tokens besides" if graph_tokens else ""
    return layers, (
        f"gradient checkpointing on {shown} of {total} layers for micro-batches of up to "
        f"{max_tokens} tokens ({free / GIB:.1f} GiB free{twice})"
    )
