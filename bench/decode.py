"""Batch-1 greedy decode speed: stock transformers `generate()` against selftune's decode paths.

    python bench/decode.py                                  # the 7B config, random bf16, CUDA
    python bench/decode.py --tokens 64 --device cpu --model bench/configs/tiny.json

Cases, one process, one model, the same prompt and answer length:
- stock `model.generate()` with its dynamic cache, then with `cache_implementation="static"`;
- selftune's plain loop (`decode_steps`, the path of batches and of CPU);
- selftune's static cache + CUDA graphs (`static_decode`, the path of one row on CUDA, with
  Liger's RMSNorm/RoPE/SwiGLU kernels where installed), on the base model, with an unmerged LoRA
  adapter (r=8, all-linear) through PEFT's forward and through grouped LoRA (the default on
  CUDA), and with it merged. `--profile` prints the kernels of one eager decode step.
The answer runs to `--tokens` (no end token counts). Each case is timed as the median of three
calls after one that warms up (for the graph path it captures), and prints one JSON line: tokens/s, ms per token,
peak memory, and the weight bandwidth that speed implies. Then, for stock's dynamic cache and for
the static path, stock's answer is fed back token by token and each step's logits are compared
with one full forward (random weights give near-flat logits, so greedy answers part at near-ties:
this says whether the numbers agree as closely as stock's own). A last line gives the ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selftune.accel.kernels import decode_attention  # noqa: E402
from selftune.infer import static_decode  # noqa: E402
from selftune.infer.generate import decode_steps  # noqa: E402
from selftune.infer.sampling import SamplingParams  # noqa: E402

CONFIG = Path(__file__).parent / "configs" / "qwen2.5-7b-instruct.config.json"


def build(config_path: str, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_path)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(run, device: str, repeats: int = 3) -> tuple[list[int], float]:
    """(tokens, seconds) of the median of `repeats` calls after one that warms up (and
    captures graphs): a first timed call can catch the GPU still raising its clocks."""
    run()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = run()
        sync(device)
        times.append(time.perf_counter() - start)
    return tokens, sorted(times)[len(times) // 2]


def stock(model, prompt: list[int], tokens: int, cache: str | None):
    def run() -> list[int]:
        ids = torch.tensor([prompt], device=model.device)
        extra = {"cache_implementation": cache} if cache else {}
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=0,
            **extra,
        )
        return out[0, len(prompt) :].tolist()

    return run


def plain(model, prompt: list[int], tokens: int):
    def run() -> list[int]:
        static_decode.disable(model)
        try:
            steps = decode_steps(model, [prompt], SamplingParams(max_new_tokens=tokens), set(), 0)
            return [step[0] for step in steps]
        finally:
            model._selftune_static_decoder = None

    return run


def graphs(model, prompt: list[int], tokens: int):
    def run() -> list[int]:
        steps = static_decode.static_steps(
            model, prompt, SamplingParams(max_new_tokens=tokens), set()
        )
        return list(steps)

    return run


@torch.inference_mode()
def forced_logits(model, prompt: list[int], answer: list[int], static: bool) -> torch.Tensor:
    """Each step's logits with `answer` fed token by token (the static path, or a dynamic cache
    as stock decodes)."""
    from transformers import DynamicCache

    from selftune.infer.static_decode import cache_keyword

    if static:
        decoder = static_decode.decoder_for(model)
        bucket = decoder.bucket(static_decode.bucket_length(len(prompt) + len(answer) + 2))
        got = [decoder.prefill(bucket, prompt)[0].float()]
        for token in answer[:-1]:
            bucket.token.fill_(token)
            got.append(decoder.replay(bucket, decoder.state())[0][0].float().clone())
        return torch.stack(got)
    cache = {cache_keyword(model): DynamicCache()}
    ids = torch.tensor([prompt], device=model.device)
    got = []
    for token in [None, *answer[:-1]]:
        if token is not None:
            ids = torch.tensor([[token]], device=model.device)
        got.append(model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache).logits[0, -1])
    return torch.stack(got).float()


@torch.inference_mode()
def forced_agreement(model, prompt: list[int], answer: list[int], static: bool) -> dict:
    """Feed `answer` step by step and compare each step's logits with one full forward over
    prompt + answer. Random weights give near-flat logits, so greedy answers part at near-ties;
    the stock dynamic cache, measured the same way, is the bf16 noise floor to compare with."""
    full = model(input_ids=torch.tensor([prompt + answer], device=model.device)).logits[0]
    expected = full[len(prompt) - 1 : -1].float()
    got = forced_logits(model, prompt, answer, static)
    scale = expected.abs().max().item()
    top2 = expected.topk(2, dim=-1).values
    return {
        "max_abs_diff_over_max_logit": round((got - expected).abs().max().item() / scale, 4),
        "argmax_agreement": round((got.argmax(-1) == expected.argmax(-1)).float().mean().item(), 3),
        "median_top2_gap_over_max_logit": round(
            (top2[:, 0] - top2[:, 1]).median().item() / scale, 4
        ),
    }


@torch.inference_mode()
def profile_step(model, prompt: list[int]) -> None:
    """The kernels of 8 eager static-cache steps (what one graph replay launches)."""
    from torch.profiler import ProfilerActivity, profile

    decoder = static_decode.decoder_for(model)
    bucket = decoder.bucket(static_decode.bucket_length(len(prompt) + 16))
    decoder.prefill(bucket, prompt)
    decoder.run_step(bucket)
    sync("cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(8):
            decoder.run_step(bucket)
        sync("cuda")
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type.name == "CUDA")
    print(json.dumps({"case": "profile", "kernels_per_step": kernels / 8}), flush=True)
    print(events.table(sort_by="self_cuda_time_total", row_limit=30), flush=True)


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(CONFIG), help="a config .json (random weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=256, help="answer length")
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument(
        "--selftune_only", action="store_true", help="skip stock's cases (and the ratios)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="kernel table of one eager LoRA decode step"
    )
    parser.add_argument(
        "--no_liger", action="store_true", help="decode without Liger's kernels where installed"
    )
    parser.add_argument(
        "--attention_ab",
        action="store_true",
        help="also decode the base with transformers' attention (kernels.decode_attention off)",
    )
    args = parser.parse_args()

    if args.no_liger:
        import selftune.accel.liger

        selftune.accel.liger.apply_liger = lambda model: False
    if args.device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(args.device))  # as selftune.models.load.load_model does
    model = build(args.model, args.device)
    prompt = torch.randint(
        10,
        model.config.vocab_size,
        (args.prompt_tokens,),
        generator=torch.Generator().manual_seed(1),
    ).tolist()
    weights = weight_bytes(model)
    results: dict[str, dict] = {}
    answers: dict[str, list[int]] = {}

    def measure(name: str, run) -> None:
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        answer, seconds = timed(run, args.device)
        per_token = seconds / len(answer)
        record = {
            "case": name,
            "tokens": len(answer),
            "tok_s": round(len(answer) / seconds, 1),
            "ms_per_token": round(1000 * per_token, 2),
            "weight_GB_s": round(weights / per_token / 1e9, 1),
        }
        if args.device.startswith("cuda"):
            record["peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        print(json.dumps(record), flush=True)
        results[name] = record
        answers[name] = answer

    if not args.selftune_only:
        measure("stock dynamic cache", stock(model, prompt, args.tokens, None))
        measure("stock static cache", stock(model, prompt, args.tokens, "static"))
    measure("selftune plain loop", plain(model, prompt, args.tokens))
    measure("selftune static + graphs", graphs(model, prompt, args.tokens))
    if args.attention_ab:  # the same with transformers' attention (RoPE, cache update, SDPA)
        static_decode.disable(model)
        model._selftune_static_decoder = None
        supported, decode_attention.SUPPORTED = decode_attention.SUPPORTED, ()
        measure("selftune static + graphs, attention unfused", graphs(model, prompt, args.tokens))
        decode_attention.SUPPORTED = supported
        static_decode.disable(model)
        model._selftune_static_decoder = None

    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    tuned = get_peft_model(model, lora).eval()
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    # PEFT's own LoRA forward inside the graphs: no grouped LoRA, no stacked projections
    on_gpu = args.device.startswith("cuda")
    tuned._selftune_static_decoder = static_decode.StaticDecoder(tuned, on_gpu, fast=False)
    measure(
        "selftune static + graphs, LoRA unmerged, PEFT forward",
        graphs(tuned, prompt, args.tokens),
    )
    tuned._selftune_static_decoder = None  # a new decoder: grouped LoRA, stacked projections
    measure("selftune static + graphs, LoRA unmerged", graphs(tuned, prompt, args.tokens))
    if args.profile:
        profile_step(tuned, prompt)
    tuned.merge_adapter()
    measure("selftune static + graphs, LoRA merged", graphs(tuned, prompt, args.tokens))

    reference = answers.get("stock dynamic cache", answers["selftune plain loop"])
    tuned.unmerge_adapter()
    forced = forced_agreement(tuned, prompt, reference, True)  # stacked LoRA decode steps
    print(
        json.dumps(
            {"case": "teacher-forced static + graphs, LoRA unmerged, vs one full forward", **forced}
        )
    )
    with tuned.disable_adapter():
        for name, static in (("stock dynamic cache", False), ("static + graphs", True)):
            forced = forced_agreement(model, prompt, reference, static)
            print(json.dumps({"case": f"teacher-forced {name} vs one full forward", **forced}))

    def agree(tokens: list[int]) -> int:
        same = 0
        for a, b in zip(tokens, reference):
            if a != b:
                break
            same += 1
        return same

    if args.selftune_only:
        return
    base = results["stock dynamic cache"]["tok_s"]
    static = results["stock static cache"]["tok_s"]
    ours = results["selftune static + graphs"]["tok_s"]
    summary = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "weights_GB": round(weights / 1e9, 2),
        "ratio_vs_stock_dynamic": round(ours / base, 2),
        "ratio_vs_stock_static": round(ours / static, 2),
        "leading_tokens_equal_to_stock": {
            name: agree(answers[name])
            for name in ("selftune plain loop", "selftune static + graphs")
        },
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
