"""Compile the Triton kernels of a LoRA training step before its first step launches them.

Triton compiles a kernel at its first launch for each specialisation (dtypes, constants, each
integer's divisibility by 16), and keeps it on disk for later processes. On a machine's first
run that cache is empty, and the first training steps wait for the compiler (bench/README.md).
Launched once on one-row tensors of the model's widths while its weights are read
(models.preload), the dropout, SwiGLU and cross-entropy kernels compile in that time instead,
and the step's own launches find them compiled.
"""

from __future__ import annotations

from pathlib import Path

import torch

from selftune.accel.kernels import ce_rows, dropout, load_triton, swiglu
from selftune.accel.kernels.lora import SHARED_INPUT


def model_shapes(folder: Path) -> tuple[set[int], int]:
    """The widths of the inputs LoRA drops out (hidden, MLP and o_proj's attention width), and
    the vocabulary."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder).get_text_config()
    hidden = config.hidden_size
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads else hidden)
    widths = {hidden, getattr(config, "intermediate_size", None) or hidden}
    return widths | ({heads * head_dim} if heads else set()), config.vocab_size


def precompile(folder: Path, rank: int, dtype: torch.dtype, device: str) -> bool:
    """Launch each kernel once for the model in `folder`, the dropout kernels for LoRA of rank
    `rank` (none for 0); False where they would not run (no GPU, no Triton, not 16-bit)."""
    if not device.startswith("cuda") or dtype not in (torch.float16, torch.bfloat16):
        return False
    if load_triton() is None:
        return False
    widths, vocab = model_shapes(folder)
    with torch.cuda.device(torch.device(device)):  # Triton launches on the thread's own device
        launch_each(widths, vocab, rank, dtype, device)
    return True


def launch_each(widths: set[int], vocab: int, rank: int, dtype: torch.dtype, device: str) -> None:
    seed = torch.zeros(1, dtype=torch.int64, device=device)  # not drawn: the generator is the run's
    # a group's stacked rank: one projection alone, or those that share an input
    stacked = {k * rank for k in {1, *map(len, SHARED_INPUT)} if k * rank <= dropout.MAX_RANK}
    for width in widths if rank else ():
        x = torch.zeros(1, width, dtype=dtype, device=device)
        dropout.dropped(x, 0.05, seed)
        for ranks in stacked:
            low = torch.zeros(1, ranks, dtype=dtype, device=device)
            a_all = torch.zeros(ranks, width, dtype=dtype, device=device)
            dropout.input_grad(low, a_all, 0.05, seed)
        if rank <= swiglu.MAX_RANK:  # gate and up's activation (one specialisation serves
            # every width that 16 divides, as the models' MLP widths are), its backward with
            # down_proj's adapter gradient handed in and without
            low = torch.zeros(1, 2 * rank, dtype=dtype, device=device)
            b_scaled = [torch.zeros(width, rank, dtype=dtype, device=device)] * 2
            out = swiglu.kernel_forward(x, x, low, b_scaled)
            low_grad = torch.zeros(1, rank, dtype=dtype, device=device)
            a_down = torch.zeros(rank, width, dtype=dtype, device=device)
            for deferred in (low_grad, a_down), None:
                swiglu.kernel_backward_(out, x.clone(), x.clone(), low, b_scaled, deferred)
    logits = torch.zeros(1, vocab, dtype=dtype, device=device)
    ce_rows.ce_rows(logits, torch.zeros(1, dtype=torch.int64, device=device), write_grad=True)
