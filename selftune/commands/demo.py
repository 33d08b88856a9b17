"""`selftune demo`: the whole story on the embedded model: before, fine-tune, after, numbers."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from selftune.args import DemoArgs, EvalArgs
from selftune.infer.generate import generate
from selftune.infer.sampling import SamplingParams

ARGS = DemoArgs
log = logging.getLogger(__name__)

QUESTIONS = [
    "你是谁?",
    "Who are you?",
    "谁开发了你?",
    "What is your name?",
    "What is the capital of France?",
    "法国的首都是哪里?",
]


def ask(model, tokenizer, system: str | None) -> list[str]:
    prompts = [
        ([{"role": "system", "content": system}] if system else [])
        + [{"role": "user", "content": q}]
        for q in QUESTIONS
    ]
    done = generate(model, tokenizer, prompts, SamplingParams(max_new_tokens=60))
    return [c.text.strip().replace("\n", " ") for c in done]


def show(before: list[str], after: list[str]) -> str:
    lines = ["", "== before and after fine-tuning (greedy) =="]
    for question, old, new in zip(QUESTIONS, before, after):
        lines += [f"Q: {question}", f"   before: {old}", f"   after:  {new}"]
    return "\n".join(lines)


def run(args: DemoArgs) -> int:
    from selftune.data.identity import model_default_system
    from selftune.infer.evaluate import Identity, markdown, run_eval
    from selftune.models.load import load_for_inference, load_model
    from selftune.train.recipe import train_run

    log.info("step 1/4: the base model answers before training")
    model, tokenizer, _ = load_model(args.model, args.torch_dtype, args.device)
    before = ask(model, tokenizer, args.system)
    del model
    log.info("step 2/4: fine-tuning on the built-in identity (+%d replay rows)", args.replay)
    last = train_run(args)
    log.info("step 3/4: the tuned model answers")
    eval_args = EvalArgs(
        adapters=[str(last)],
        torch_dtype=args.torch_dtype,
        device=args.device,
        eval_limit=args.eval_limit,
    )
    loaded = load_for_inference(eval_args)
    after = ask(loaded.model, loaded.tokenizer, args.system)
    print(show(before, after))
    log.info("step 4/4: identity and retention on held-out questions")
    report = run_eval(
        loaded,
        Identity(args.model_name, args.model_author),
        args.system,
        model_default_system(loaded.tokenizer),
        eval_args,
    )
    table = markdown(report)
    print("\n" + table)
    from selftune.atomic import write_json_atomic

    write_json_atomic(Path(last) / "eval.json", {**dataclasses.asdict(report), "markdown": table})
    print(f"\ncheckpoint: {last}\nchat with it: selftune infer --adapters {last}")
    return 0
