"""The fast path computes the same loss and gradients as the slow path, on whatever device.

    python bench/check_fast_path.py [--config CONFIG] [--layers 4]

Builds the architecture with few layers and random weights, packs rows of random lengths, and
compares selftune's fast path (packed varlen attention, Liger kernels, chunked label-only
cross-entropy) with stock transformers + PEFT run row by row. Prints JSON with the relative
differences; exits 1 when they exceed bf16 tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_throughput import rows  # noqa: E402
from selftune.accel.fast_path import enable_fast_path  # noqa: E402
from selftune.data.batches import packed  # noqa: E402
from selftune.train.loop import accumulate_gradients, to_device  # noqa: E402


def build(config_path: str, layers: int, device: str, seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_path)
    layers = min(layers, config.num_hidden_layers)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    torch.manual_seed(seed + 1)
    model = get_peft_model(
        model,
        LoraConfig(
            r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )
    for name, param in model.named_parameters():  # make the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model


def lora_grads(model) -> torch.Tensor:
    return torch.cat(
        [
            p.grad.float().flatten()
            for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--config",
        default=str(Path(__file__).parent / "configs" / "qwen2.5-7b-instruct.config.json"),
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--no_liger", action="store_true")
    parser.add_argument("--no_varlen", action="store_true")
    parser.add_argument("--gqa_repeat", action="store_true", help="repeat k/v heads, no enable_gqa")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab = json.loads(Path(args.config).read_text())["vocab_size"]
    examples = rows(12, 170, 54, 63, 280, vocab, 5)

    stock = build(args.config, args.layers, device, 0)
    n_tokens = sum(sum(1 for t in e.labels[1:] if t != -100) for e in examples)
    stock_loss = 0.0
    for e in examples:  # one row at a time, loss weighted by its label tokens
        batch = {
            "input_ids": torch.tensor([e.input_ids], device=device),
            "labels": torch.tensor([e.labels], device=device),
        }
        count = sum(1 for t in e.labels[1:] if t != -100)
        loss = stock(**batch).loss * count / n_tokens
        loss.backward()
        stock_loss += float(loss.detach())
    stock_grads = lora_grads(stock)
    del stock

    fast = build(args.config, args.layers, device, 0)
    enabled = enable_fast_path(
        fast.get_base_model(),
        device,
        packing=True,
        liger=not args.no_liger,
        varlen=not args.no_varlen,
    )
    if args.gqa_repeat:
        import selftune.accel.kernels.attention as attention

        attention.GQA_NATIVE = False
        enabled.append("gqa by repeat")
    group = [to_device(b, device) for b in packed(examples, 4096)]
    fast_sum, tokens, _ = accumulate_gradients(fast, group)
    fast_grads = lora_grads(fast)
    loss_diff = abs(fast_sum / tokens - stock_loss) / abs(stock_loss)
    grad_diff = float((fast_grads - stock_grads).norm() / stock_grads.norm())
    tolerance = 2e-2 if device == "cuda" else 1e-4
    report = {
        "device": device,
        "fast_path": enabled,
        "packs": len(group),
        "tokens": tokens,
        "stock_loss": stock_loss,
        "fast_loss": fast_sum / tokens,
        "loss_rel_diff": loss_diff,
        "grad_rel_diff": grad_diff,
        "tolerance": tolerance,
    }
    print(json.dumps(report))
    sys.exit(0 if loss_diff < tolerance and grad_diff < 5 * tolerance else 1)


if __name__ == "__main__":
    main()
