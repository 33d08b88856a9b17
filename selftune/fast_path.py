"""The GPU fast path for training, switched on where it can run and said once in the log.

- packed rows attend within their own conversation only (kernels.attention, varlen flash);
- logits only at label positions, chunked, never all held (kernels.linear_ce, in train.py);
- Liger's fused RMSNorm / RoPE / SwiGLU kernels where `liger-kernel` is installed;
- LoRA projections that share an input (q/k/v, gate/up) run as one group in bf16
  (kernels.lora): one dropout, one GEMM for their A matrices, float32 master adapters; a
  SwiGLU MLP's gate, up and activation as one node, the rank-r products added inside the
  activation (kernels.lora_mlp);
- gradient checkpointing on only as many decoder layers as the GPU's free memory needs
  (`auto_checkpoint_layers`), since recomputing a layer costs a third of its step.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

LIGER_PATCHES = {
    "qwen2": "apply_liger_kernel_to_qwen2",
    "llama": "apply_liger_kernel_to_llama",
    "mistral": "apply_liger_kernel_to_mistral",
    "qwen3": "apply_liger_kernel_to_qwen3",
}


def apply_liger(model: Any) -> bool:
    """Swap RMSNorm, RoPE and SwiGLU for Liger's Triton kernels on this model instance.

    Liger also rebinds the modeling module's names: its classes, which only later models would
    build from, go back to the library's; its RoPE function, which every model of the family
    calls, runs Liger's kernel on CUDA tensors and the library's elsewhere (a CPU model in the
    same process would fail in Triton)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return False
    family = model.config.model_type
    name = LIGER_PATCHES.get(family)
    if name is None:
        return False
    import liger_kernel.transformers as liger

    # the module Liger patches, whatever the model's own class
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    before = dict(vars(module))
    try:
        getattr(liger, name)(
            rope=True,
            rms_norm=True,
            swiglu=True,
            cross_entropy=False,
            fused_linear_cross_entropy=False,
            model=model,
        )
    finally:  # also where Liger failed half way
        for key, library in before.items():
            patched = vars(module).get(key, library)
            if patched is library:
                continue
            if key == "apply_rotary_pos_emb":
                setattr(module, key, rope_on_cuda_only(patched, library))
            else:
                setattr(module, key, library)
    from selftune.kernels.lora_mlp import reroute_mlps

    reroute_mlps(model)  # MLPs routed for training before (decode after training) keep it
    return True


def rope_on_cuda_only(
    kernel: Callable[..., Any], library: Callable[..., Any]
) -> Callable[..., Any]:
    """`apply_rotary_pos_emb` by `kernel` for CUDA tensors, by the library's function otherwise.
    The arguments pass through as given: the attention code calls it with (q, k, cos, sin),
    which both take alike (their fifth positional parameters differ)."""
    library = getattr(library, "library", library)  # applied twice: one level, not a chain

    def apply_rotary_pos_emb(q: Any, k: Any, *args: Any, **kwargs: Any) -> Any:
        use = kernel if q.is_cuda else library
        return use(q, k, *args, **kwargs)

    apply_rotary_pos_emb.library = library  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


def packs_safely(model: Any) -> bool:
    """Whether packed rows train on this model exactly as separate rows: the families whose
    attention our varlen kernel reproduces (full causal attention, no logit soft-capping, no
    sliding window). Others keep padded rows unless --packing asks otherwise."""
    config = model.config
    if config.model_type not in LIGER_PATCHES:
        return False
    if getattr(config, "attn_logit_softcapping", None):
        return False
    windowed = getattr(config, "sliding_window", None) and getattr(
        config, "use_sliding_window", True
    )
    layer_types = getattr(config, "layer_types", None) or []
    return not windowed and all(t == "full_attention" for t in layer_types)


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
    checkpointing). About 20 x hidden + 8 x intermediate, fitted to the 7B config (one and two
    2048-token rows peaked at 26.1 and 37.9 GiB unchecked, 14.2 GiB of it weights; this gives
    26.1 and 38.0); a checkpointed layer keeps its input alone."""
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
    of `graph_tokens` (selftune.step_graphs). Returns (layers, a line for the log)."""
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


def enable_fast_path(
    model: Any,
    device: str,
    packing: bool,
    liger: bool = True,
    varlen: bool = True,
    grouped_lora: bool = True,
) -> list[str]:
    """Turn on what runs here; return the names of what was enabled (for the log)."""
    enabled: list[str] = []
    if not device.startswith("cuda"):
        return enabled
    if liger and apply_liger(model):
        enabled.append("liger rmsnorm/rope/swiglu")
    elif liger:
        log.info(
            "fast path: liger-kernel not installed (pip install liger-kernel); using "
            "PyTorch kernels"
        )
    if grouped_lora:  # after Liger: its SwiGLU forward is the one a LoRA MLP falls back on
        enabled += use_grouped_lora(model)
    if packing and varlen:
        import torch

        from selftune.kernels.attention import use_varlen_attention

        dtype = next(model.parameters()).dtype
        if dtype not in (torch.float16, torch.bfloat16):  # the flash kernels take 16-bit only
            log.info("fast path: %s weights; packed rows use a masked SDPA", dtype)
        elif use_varlen_attention(model):
            enabled.append("varlen attention for packed rows")
        else:
            log.info("fast path: no varlen attention kernel here; packed rows use a masked SDPA")
    enabled.append("label-only chunked cross-entropy")
    return enabled


def use_grouped_lora(model: Any) -> list[str]:
    """Route plain LoRA layers through kernels.lora, except under several processes (FSDP2
    swaps parameters under the modules; PEFT's own forward is the one checked there)."""
    import torch.distributed as dist

    from selftune.kernels.lora import fuse_lora

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        log.info("fast path: grouped LoRA is off under several processes")
        return []
    routed = fuse_lora(model)
    return [f"grouped bf16 LoRA ({routed} layers)"] if routed else []


def disable_fast_path(model: Any) -> None:
    """Give the model back its library forwards where they were replaced for training."""
    from selftune.kernels.lora import unfuse_lora

    unfuse_lora(model)
