"""A QLoRA adapter is a plain PEFT adapter: trained on the 4-bit base, it loads on the bf16 base
and answers as the 4-bit model does. Needs CUDA and bitsandbytes.

    python bench/check_qlora_adapter.py --tokenizer TOKENIZER_DIR --out /tmp/qlora-check

Builds a small random Llama with a real tokenizer (SmolLM2's), trains it with
`selftune sft --train_type qlora` on the tutorial's self-cognition rows, then answers those
questions greedily with the adapter on the 4-bit base (`--quant_bits 4`) and on the bf16 base,
and prints one JSON object: how many answers match, and the answers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "tests" / "fixtures" / "self_cognition.json"


def build_model(tokenizer_dir: Path, out: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder = out / "tiny-llama"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def answers(checkpoint: Path, quant_bits: int | None, questions: list[str]) -> list[str]:
    from selftune.args import InferArgs
    from selftune.infer.generate import generate
    from selftune.infer.sampling import SamplingParams
    from selftune.models.load import load_for_inference

    loaded = load_for_inference(
        InferArgs(adapters=[str(checkpoint)], quant_bits=quant_bits, torch_dtype="bfloat16")
    )
    conversations = [[{"role": "user", "content": q}] for q in questions]
    done = generate(
        loaded.model, loaded.tokenizer, conversations, SamplingParams(max_new_tokens=40)
    )
    return [c.text for c in done]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="folder with a chat tokenizer")
    parser.add_argument("--out", default="/tmp/qlora-check")
    parser.add_argument("--steps", type=int, default=80)
    args = parser.parse_args()
    out = Path(args.out)
    model_dir = build_model(Path(args.tokenizer), out)
    command = [
        sys.executable, "-m", "selftune", "sft", "--model", str(model_dir),
        "--train_type", "qlora", "--dataset", str(DATA), "--output_dir", str(out / "output"),
        "--max_steps", str(args.steps), "--learning_rate", "3e-3", "--lora_rank", "16",
        "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
        "--save_steps", str(args.steps), "--logging_steps", "20",
    ]  # fmt: skip
    subprocess.run(command, check=True)
    (checkpoint,) = (out / "output").glob("v*/checkpoint-*")
    files = sorted(p.name for p in checkpoint.iterdir())
    questions = [row["instruction"] for row in json.loads(DATA.read_text(encoding="utf-8"))]
    four_bit = answers(checkpoint, 4, questions)
    bf16 = answers(checkpoint, None, questions)
    log = [json.loads(line) for line in (checkpoint.parent / "logging.jsonl").open()]
    result = {
        "checkpoint_files": files,
        "loss_first_last": [log[0]["loss"], log[-1]["loss"]],
        "peak_gib": log[-1].get("memory_gib"),
        "prompts": len(questions),
        "greedy_match": sum(a == b for a, b in zip(four_bit, bf16)),
        "answers": [{"q": q, "4bit": a, "bf16": b} for q, a, b in zip(questions, four_bit, bf16)],
    }
    print(json.dumps(result, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
