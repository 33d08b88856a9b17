"""Training throughput: stock transformers + PEFT against selftune, same process, same shapes.

    python bench/train_throughput.py --config bench/configs/qwen2.5-7b-instruct.config.json
    python bench/train_throughput.py --case seq2048 --case tutorial   # a subset

Random weights of the given architecture, bf16, LoRA r=8 alpha=32 all-linear. Prints one JSON
object per measurement and a final JSON summary with the ratios. Cases:
  seq2048   2048-token sequences, gradient checkpointing on (stock: batch 1; selftune: each
            --ours variant ROWS:LAYERS, ROWS 2048-token rows per packed micro-batch and LAYERS
            decoder layers checkpointed, "all" or a number)
  best      best setting within 40 GiB (stock: no checkpointing; selftune: each --best variant)
  tutorial  the tutorial's run: 8 identity rows x 10 epochs, 16 rows per optimizer step
  mixed     the tutorial's mixed recipe: 1,008 rows of 170 +- 54 tokens, 3 epochs, 16 rows/step
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selftune.accel import step_graphs as step_graphs_module  # noqa: E402
from selftune.accel.fast_path import enable_fast_path  # noqa: E402
from selftune.accel.memory import (  # noqa: E402
    choose_checkpointing,
    enable_checkpointing,
    set_checkpointing,
)
from selftune.accel.step_graphs import planned_tokens  # noqa: E402
from selftune.data.batches import StepRows, assemble, packed, step_pack_tokens  # noqa: E402
from selftune.data.encode import Example  # noqa: E402
from selftune.train.loop import make_optimizer, to_device  # noqa: E402

USE_LIGER = True
USE_VARLEN = True
USE_GROUPED_LORA = True
LORA_DROPOUT = 0.05
USE_GRAPHS = True
PROFILE = False
PROFILE_STACKS = False


def build(config_path: str, device: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_path)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    lora = LoraConfig(
        r=8,
        lora_alpha=32,
        lora_dropout=LORA_DROPOUT,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    return model


def quantize_nf4(model) -> None:
    """Swap every decoder Linear for bitsandbytes' NF4 Linear4bit (double quantisation, bf16
    compute), as from_pretrained(quantization_config=BitsAndBytesConfig(...)) would."""
    import bitsandbytes as bnb

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and name != "lm_head":
                quantized = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=torch.bfloat16,
                    compress_statistics=True,
                    quant_type="nf4",
                    device="cpu",
                )
                quantized.weight = bnb.nn.Params4bit(
                    child.weight.data,
                    requires_grad=False,
                    compress_statistics=True,
                    quant_type="nf4",
                ).to(child.weight.device)
                if child.bias is not None:
                    quantized.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(module, name, quantized)
    torch.cuda.empty_cache()


def build_qlora(config_path: str, device: str, stock: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_path)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    model.requires_grad_(False)
    quantize_nf4(model)
    if stock:  # the usual QLoRA recipe: norms/embeddings upcast, checkpointing on
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(
        r=8,
        lora_alpha=32,
        lora_dropout=LORA_DROPOUT,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    return model


def case_qlora(config, device, vocab, seq, steps, results):
    examples = rows(steps + 2, seq, 0, seq, seq, vocab, 1)
    for ex in examples:
        ex.labels = list(ex.input_ids)
    torch.cuda.empty_cache()
    model = build_qlora(config, device, stock=True)
    batches = [[padded_one(e, device)] for e in examples]
    results["qlora/stock"] = emit(
        {"case": "qlora", "impl": "stock+bnb", **timed(stock_step, model, batches, 2)}
    )
    del model, batches
    torch.cuda.empty_cache()
    model = build_qlora(config, device, stock=False)
    base = model.get_base_model()
    enabled = enable_fast_path(base, device, True, liger=USE_LIGER, varlen=USE_VARLEN)
    set_checkpointing(base, None)
    packs = [[to_device(b, device)] for b in packed(examples, seq)]
    results["qlora/selftune"] = emit(
        {
            "case": "qlora",
            "impl": "selftune",
            "fast_path": enabled,
            **timed(selftune_step, model, packs, 2),
        }
    )
    del model


def rows(n: int, mean: float, std: float, low: int, high: int, vocab: int, seed: int):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = int(min(high, max(low, rng.gauss(mean, std))))
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        prompt = length // 3
        out.append(Example(input_ids=ids, labels=[-100] * prompt + ids[prompt:]))
    return out


def padded_one(example: Example, device: str) -> dict:
    ids = torch.tensor([example.input_ids], device=device)
    return {"input_ids": ids, "labels": torch.tensor([example.labels], device=device)}


def stock_step(model, micro_batches, optimizer) -> int:
    """What users run today: model(..., labels=...).loss, mean of micro-batch means."""
    tokens = 0
    for batch in micro_batches:
        loss = model(**batch).loss / len(micro_batches)
        loss.backward()
        tokens += batch["input_ids"].numel()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return tokens


def selftune_step(model, micro_batches, optimizer, graphs=None) -> int:
    """The passes and update queued, then the step's loss read, in `selftune sft`'s order (its
    gradient clipping and learning-rate schedule left out, as in the stock step)."""
    from selftune.train.loop import backward_step

    loss, _, correct = backward_step(model, micro_batches, graphs=graphs)
    optimizer.step()
    optimizer.zero_grad(set_to_none=graphs is None)
    loss.item()  # what the loop reads for its log, once a step
    correct.item()
    return sum(int(b["input_ids"].numel()) - b.get("pad_tokens", 0) for b in micro_batches)


def step_graphs(model, device: str):
    """CUDA graphs for the passes, as `selftune sft` takes them (train.step_graphs_fit)."""
    from selftune.accel.step_graphs import StepGraphs
    from selftune.train.loss import batch_loss

    if not USE_GRAPHS or device != "cuda":
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    return StepGraphs(lambda batch: batch_loss(model, batch), model, params)


class GpuSampler:
    """The GPU's SM clock and power draw, sampled by nvidia-smi every 200 ms while the timed
    steps run: whether a figure came from a throttled chip (the same code moved by a few
    percent from machine to machine). Empty where nvidia-smi is not installed."""

    QUERY = "clocks.sm,power.draw,temperature.gpu"

    def __enter__(self) -> GpuSampler:
        self.process = None
        if shutil.which("nvidia-smi") and torch.cuda.is_available():
            index = str(torch.cuda.current_device())
            self.process = subprocess.Popen(
                ["nvidia-smi", "-i", index, f"--query-gpu={self.QUERY}",
                 "--format=csv,noheader,nounits", "-lms", "200"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
        return self

    def __exit__(self, *_) -> None:
        self.summary: dict = {}
        if self.process is None:
            return
        self.process.terminate()
        out, _ = self.process.communicate()
        samples = []
        for line in out.splitlines():
            try:
                samples.append([float(v) for v in line.split(",")])
            except ValueError:
                continue
        if samples:
            columns = list(zip(*samples))
            self.summary = {
                "sm_mhz_mean": round(sum(columns[0]) / len(samples)),
                "sm_mhz_min": round(min(columns[0])),
                "power_w_mean": round(sum(columns[1]) / len(samples), 1),
                "temperature_c_max": round(max(columns[2])),
                "gpu_samples": len(samples),
            }


def timed(step, model, steps_batches, warmup: int, graphs=None):
    # fused AdamW for both: the HF Trainer's default optimizer, and selftune's on one GPU
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], 1e-5, 0.0)
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    if graphs is not None:
        step = functools.partial(step, graphs=graphs)
    if torch.cuda.is_available():  # from before the warm-up: a graph's memory is taken there
        torch.cuda.reset_peak_memory_stats()
    warm_peaks = []  # the peak so far after each warm-up step: where the memory is taken
    for batches in steps_batches[:warmup]:
        step(model, batches, optimizer)
        if torch.cuda.is_available():
            warm_peaks.append(round(torch.cuda.max_memory_allocated() / 2**30, 2))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    with GpuSampler() as gpu:
        started = time.perf_counter()
        tokens = 0
        for batches in steps_batches[warmup:]:
            tokens += step(model, batches, optimizer)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    measured = max(1, len(steps_batches) - warmup)
    cuda = torch.cuda.is_available()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0
    return {
        "tokens_per_s": round(tokens / seconds, 1),
        "step_s": round(seconds / measured, 4),
        "seconds": round(seconds, 3),
        "steps": measured,
        "peak_gib": round(peak, 2),
        "reserved_gib": round(reserved, 2),
        "warmup_peaks_gib": warm_peaks,
        **gpu.summary,
        **(
            {"graphs": len(graphs.graphs), "replays": graphs.replays, "failure": graphs.failure}
            if graphs
            else {}
        ),
    }


def emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


def fresh(config: str, device: str, impl: str, checkpoint_layers, packing: bool, tokens: int = 0):
    """A new model; for selftune, checkpoint_layers "auto" chooses as `selftune sft` does for
    micro-batches of up to `tokens` tokens."""
    gc.collect()  # the grouped-LoRA closures make the last model a cycle: free it first
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    model = build(config, device)
    if impl == "selftune":
        base = model.get_base_model()
        enabled = enable_fast_path(
            base,
            device,
            packing,
            liger=USE_LIGER,
            varlen=USE_VARLEN,
            grouped_lora=USE_GROUPED_LORA,
        )
        if checkpoint_layers == "auto":
            graphed = USE_GRAPHS and device == "cuda"  # planned as `selftune sft` plans it
            tokens, graph_tokens = planned_tokens(tokens) if graphed else (tokens, 0)
            checkpoint_layers, said = choose_checkpointing(base, None, device, tokens, graph_tokens)
            enabled.append(said)
        set_checkpointing(base, checkpoint_layers)
        return model, enabled
    if checkpoint_layers != 0:
        enable_checkpointing(model)  # what stock users call, under either name
        model.enable_input_require_grads()
    return model, []


def parse_variant(text: str) -> tuple[int, int | None]:
    """ROWS:LAYERS -> (rows per pack, checkpointed layers: None = all, 0 = none)."""
    rows_text, _, layers_text = text.partition(":")
    layers = None if layers_text in ("", "all") else int(layers_text)
    return int(rows_text), layers


def profile_step(model, batches) -> None:
    """Print the 40 operators and kernels that take the most GPU time in one selftune step,
    then the 25 that take the most host time."""
    from torch.profiler import ProfilerActivity, profile

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    selftune_step(model, batches, optimizer)
    torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with profile(activities=activities, with_stack=PROFILE_STACKS) as prof:
        selftune_step(model, batches, optimizer)
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(events.table(sort_by="self_cuda_time_total", row_limit=40), flush=True)
    if PROFILE_STACKS:  # where the operators come from: the Python frames that called them
        by_stack = prof.key_averages(group_by_stack_n=6)
        print(by_stack.table(sort_by="self_cuda_time_total", row_limit=60), flush=True)
    # host time: a short step is bound by it (the tutorial's 350-token packs)
    print(events.table(sort_by="self_cpu_time_total", row_limit=25), flush=True)


def case_seq(config, device, vocab, seq, steps, results, name, stock_ckpt, variants):
    most_rows = max(rows_per_pack for rows_per_pack, _ in variants)
    examples = rows(steps * most_rows + 2 * most_rows, seq, 0, seq, seq, vocab, 1)
    for ex in examples:
        ex.labels = list(ex.input_ids)
    model, _ = fresh(config, device, "stock", stock_ckpt, False)
    stock_batches = [[padded_one(e, device)] for e in examples[: steps + 2]]
    results[name + "/stock"] = emit(
        {
            "case": name,
            "impl": "stock",
            "checkpointing": stock_ckpt,
            **timed(stock_step, model, stock_batches, 2),
        }
    )
    del model
    for rows_per_pack, layers in variants:
        model, enabled = fresh(config, device, "selftune", layers, True)
        graphs = step_graphs(model, device)
        prepare = graphs.prepare if graphs is not None else (lambda batch: batch)
        used = examples[: (steps + 2) * rows_per_pack]
        packs = [to_device(prepare(b), device) for b in packed(used, seq * rows_per_pack)]
        key = f"{name}/selftune/{rows_per_pack}:{'all' if layers is None else layers}"
        record = {
            "case": name,
            "impl": "selftune",
            "fast_path": enabled,
            "checkpoint_layers": "all" if layers is None else layers,
            "rows_per_pack": rows_per_pack,
        }
        try:
            record.update(timed(selftune_step, model, [[p] for p in packs], 2, graphs))
            if PROFILE and device == "cuda":
                profile_step(model, [packs[0]])
        except torch.OutOfMemoryError:
            record["error"] = "out of memory"
        results[key] = emit(record)
        del model, packs, graphs


def case_recipe(config, device, vocab, results, name, examples, epochs, rows_per_step, stock_steps):
    steps_per_epoch = math.ceil(len(examples) / rows_per_step)
    total_steps = steps_per_epoch * epochs
    model, _ = fresh(config, device, "stock", None, False)
    stock = [
        [padded_one(e, device) for e in examples[i : i + rows_per_step]]
        for i in range(0, len(examples), rows_per_step)
    ]
    plan = (stock * epochs)[: stock_steps + 1]
    record = timed(stock_step, model, plan, 1)
    record["estimated_total_s"] = round(record["step_s"] * total_steps, 2)
    results[name + "/stock"] = emit(
        {"case": name, "impl": "stock", "total_steps": total_steps, **record}
    )
    del model
    ours = []  # as `selftune sft` on a GPU: each step's rows packed as batches.StepRows
    budget = step_pack_tokens(2048, 1, checkpointing=True)
    for i in range(0, len(examples), rows_per_step):
        ours.append(assemble([StepRows([e], budget) for e in examples[i : i + rows_per_step]]))
    largest = max(int(b["input_ids"].numel()) for group in ours for b in group)
    model, enabled = fresh(config, device, "selftune", "auto", True, largest)
    graphs = step_graphs(model, device)
    prepare = graphs.prepare if graphs is not None else (lambda batch: batch)
    ours = [[to_device(prepare(b), device) for b in group] for group in ours]
    plan = [ours[0]] + ours * epochs  # one warm-up step, then the whole run
    record = timed(selftune_step, model, plan, 1, graphs)
    record["total_s"] = record["seconds"]
    if PROFILE and device == "cuda":
        profile_step(model, ours[0])
    results[name + "/selftune"] = emit(
        {
            "case": name,
            "impl": "selftune",
            "fast_path": enabled,
            "total_steps": total_steps,
            **record,
        }
    )
    del model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        default=str(Path(__file__).parent / "configs" / "qwen2.5-7b-instruct.config.json"),
    )
    parser.add_argument(
        "--case", action="append", choices=["seq2048", "best", "tutorial", "mixed", "qlora"]
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--ours", nargs="+", default=["1:all", "2:all"], help="seq2048 variants")
    parser.add_argument("--best", nargs="+", default=["1:0", "2:10"], help="best-case variants")
    parser.add_argument("--no_liger", action="store_true")
    parser.add_argument("--no_grouped_lora", action="store_true")
    parser.add_argument("--lora_dropout", type=float, default=0.05)
    parser.add_argument(
        "--no_fused_swiglu", action="store_true", help="gate/up as grouped LoRA, then SwiGLU"
    )
    parser.add_argument("--no_graphs", action="store_true", help="every pass eager")
    parser.add_argument(
        "--graph_tokens",
        type=int,
        default=step_graphs_module.MAX_TOKENS,
        help="longest pass replayed as a CUDA graph (selftune.accel.step_graphs.MAX_TOKENS)",
    )
    parser.add_argument("--profile", action="store_true", help="kernel table of a selftune step")
    parser.add_argument(
        "--profile_stacks", action="store_true", help="with --profile: also by calling frames"
    )
    parser.add_argument("--no_varlen", action="store_true")
    parser.add_argument("--qlora", action="store_true", help="add the 4-bit QLoRA case")
    args = parser.parse_args()
    global USE_LIGER, USE_VARLEN, USE_GROUPED_LORA, PROFILE, USE_GRAPHS, PROFILE_STACKS
    global LORA_DROPOUT
    LORA_DROPOUT = args.lora_dropout
    USE_GRAPHS = not args.no_graphs
    step_graphs_module.MAX_TOKENS = args.graph_tokens
    USE_LIGER, USE_VARLEN = not args.no_liger, not args.no_varlen
    USE_GROUPED_LORA, PROFILE = not args.no_grouped_lora, args.profile
    PROFILE_STACKS = args.profile_stacks
    if args.no_fused_swiglu:  # fuse_lora then routes no MLP through LoraSwiglu
        import selftune.accel.lora_routing as lora_routing

        lora_routing.swiglu_mlp = lambda module: False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab = json.loads(Path(args.config).read_text())["vocab_size"]
    cases = args.case or ["seq2048", "best", "tutorial", "mixed"]
    results: dict[str, dict] = {}
    if "seq2048" in cases:
        variants = [parse_variant(v) for v in args.ours]
        case_seq(
            args.config, device, vocab, args.seq, args.steps, results, "seq2048", None, variants
        )
    if "best" in cases:
        variants = [parse_variant(v) for v in args.best]
        case_seq(args.config, device, vocab, args.seq, args.steps, results, "best", 0, variants)
    if "tutorial" in cases:
        identity = rows(8, 40, 8, 24, 60, vocab, 2)
        case_recipe(args.config, device, vocab, results, "tutorial", identity, 10, 16, 10)
    if "mixed" in cases:
        mixed = rows(1008, 170, 54, 63, 280, vocab, 3)
        case_recipe(args.config, device, vocab, results, "mixed", mixed, 3, 16, 3)
    if args.qlora or "qlora" in cases:
        case_qlora(args.config, device, vocab, args.seq, args.steps, results)
    summary = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    for key, record in results.items():
        case, _, impl = key.partition("/")
        stock = results.get(f"{case}/stock")
        if impl.startswith("selftune") and stock and "tokens_per_s" in record:
            summary[f"{key} ratio"] = round(record["tokens_per_s"] / stock["tokens_per_s"], 2)
            summary[f"{key} peak_gib"] = record["peak_gib"]
    for case in ("tutorial", "mixed"):
        if f"{case}/stock" in results:
            summary[f"{case}_stock_total_s"] = results[f"{case}/stock"]["estimated_total_s"]
            summary[f"{case}_selftune_total_s"] = results[f"{case}/selftune"]["total_s"]
    print(json.dumps({"summary": summary, "results": results}), flush=True)


if __name__ == "__main__":
    main()
