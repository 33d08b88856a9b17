"""Server throughput and latency at 1 and 16 concurrent clients, against an in-process server.

    python bench/serve.py                                     # the embedded model, CPU
    python bench/serve.py --model bench/configs/qwen2.5-7b-instruct.config.json --device cuda
    python bench/serve.py --mixed_adapters true               # half the clients use a LoRA

The server is the real one (engine + FastAPI app under uvicorn, on 127.0.0.1, port 0) in a
thread of this process. Each client sends `--requests` streamed chat requests one after another
(greedy, `--max_tokens` each); the clients run concurrently. A `.json` model is a config: random
weights in bf16 with the embedded model's tokenizer (or `--tokenizer DIR`, on a machine without
the embedded model), so answers run to `--max_tokens`. Prints one JSON object per client count,
then a summary with the throughput ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selftune.infer.sampling import SamplingParams  # noqa: E402
from selftune.models.load import load_model, load_tokenizer  # noqa: E402
from selftune.models.resolve import embedded_folder  # noqa: E402
from selftune.serve.app import ServerConfig, create_app  # noqa: E402
from selftune.serve.engine import Engine, ServedModel  # noqa: E402

QUESTIONS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works, step by step.",
    "Describe a walk through a busy market in the morning.",
    "Write a letter to a friend about your holiday by the sea.",
]


def build(model_spec: str, device: str, mixed_adapters: bool, tokenizer_dir: str | None):
    """(model, tokenizer, served models): a config .json gets random bf16 weights."""
    if model_spec.endswith(".json"):
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model_spec)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
        tokenizer = load_tokenizer(Path(tokenizer_dir) if tokenizer_dir else embedded_folder())
        name = Path(model_spec).name.removesuffix(".config.json")
    else:
        model, tokenizer, _ = load_model(model_spec, device=device)
        name = model_spec
    served = [ServedModel(name)]
    if mixed_adapters:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
        model = get_peft_model(model, lora, adapter_name="a0").eval()
        served.append(ServedModel("lora", "a0", parent=name))
    return model, tokenizer, served


def start_server(engine: Engine, served: list[ServedModel], max_tokens: int) -> str:
    import uvicorn

    from selftune.commands.serve import listen

    defaults = SamplingParams(max_new_tokens=max_tokens)
    app = create_app(engine, ServerConfig(served, defaults))
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def one_request(http, model: str, question: str, max_tokens: int) -> dict:
    """A streamed chat request: its latency, time to first token and completion tokens."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = None
    tokens = 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"latency": time.perf_counter() - start, "ttft": first or 0.0, "tokens": tokens}


async def run_clients(url: str, models: list[str], clients: int, requests: int, max_tokens: int):
    import httpx

    async def client(index: int) -> list[dict]:
        model = models[index % len(models)]
        results = []
        for r in range(requests):
            question = QUESTIONS[(index + r) % len(QUESTIONS)]
            results.append(await one_request(http, model, question, max_tokens))
        return results

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as http:
        start = time.perf_counter()
        per_client = await asyncio.gather(*(client(i) for i in range(clients)))
        wall = time.perf_counter() - start
    return [r for results in per_client for r in results], wall


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def measure(url: str, engine: Engine, models: list[str], clients: int, args) -> dict:
    decodes, rows = engine.decodes, engine.rows_decoded
    results, wall = asyncio.run(run_clients(url, models, clients, args.requests, args.max_tokens))
    decodes, rows = engine.decodes - decodes, engine.rows_decoded - rows
    latencies = [r["latency"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "completion_tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "latency_p50_s": round(percentile(latencies, 0.5), 3),
        "latency_p95_s": round(percentile(latencies, 0.95), 3),
        "ttft_p50_s": round(percentile([r["ttft"] for r in results], 0.5), 3),
        "mean_batch_rows": round(rows / decodes, 1) if decodes else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="model spec, or a config .json")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--max_batch_size", type=int, default=16)
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer folder for a config .json (default: embedded)"
    )
    parser.add_argument("--mixed_adapters", default="false", choices=["true", "false"])
    args = parser.parse_args()

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    mixed = args.mixed_adapters == "true"
    model, tokenizer, served = build(args.model, device, mixed, args.tokenizer)
    engine = Engine(model, tokenizer, args.max_batch_size).start()
    url = start_server(engine, served, args.max_tokens)
    models = [each.name for each in served]
    asyncio.run(run_clients(url, models, 1, 1, 4))  # warm-up: first-call costs stay out
    rows = []
    for clients in args.clients:
        row = measure(url, engine, models, clients, args)
        print(json.dumps(row), flush=True)
        rows.append(row)
    summary = {
        "model": args.model,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch_threads": torch.get_num_threads(),
        "models_served": models,
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests,
        "torch": torch.__version__,
        "results": rows,
    }
    if len(rows) > 1:
        summary["throughput_ratio"] = round(rows[-1]["tokens_per_s"] / rows[0]["tokens_per_s"], 2)
    print(json.dumps(summary, indent=2))
    engine.close()


if __name__ == "__main__":
    main()
