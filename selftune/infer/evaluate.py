"""Identity hit rate and general-skill retention of a tuned model against its base.

Identity: share of held-out identity questions whose greedy answer names the configured name or
author, as the question asks, per language and per system-prompt condition. Retention: of the
general questions the base answers right, the share the tuned model still answers right; plus
the mean per-token KL divergence from the base on the base's own answers.
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from selftune.args import EvalArgs
from selftune.errors import SelftuneError
from selftune.infer.generate import Messages, generate
from selftune.infer.sampling import SamplingParams

log = logging.getLogger(__name__)
EVAL_DATA = Path(__file__).parent / "eval_data"


@dataclass
class IdentityQuestion:
    lang: str
    query: str
    expect: str  # "name", "author" or "either"


@dataclass
class GeneralQuestion:
    lang: str
    question: str
    answers: list[str]


@dataclass
class Identity:
    names: list[str]
    authors: list[str]


@dataclass
class EvalReport:
    identity: dict[str, dict[str, float]] = field(default_factory=dict)  # condition -> lang -> rate
    identity_counts: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    retention: float | None = None
    base_correct: int = 0
    tuned_correct_of_base: int = 0
    kl: float | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def load_identity_questions(path: Path | None = None) -> list[IdentityQuestion]:
    rows = read_jsonl(path or EVAL_DATA / "identity_heldout.jsonl")
    return [IdentityQuestion(r["lang"], r["query"], r.get("expect", "either")) for r in rows]


def load_general_questions(path: Path | None = None) -> list[GeneralQuestion]:
    rows = read_jsonl(path or EVAL_DATA / "general.jsonl")
    return [GeneralQuestion(r["lang"], r["question"], list(r["answers"])) for r in rows]


def load_heldout_systems(path: Path | None = None) -> dict[str, list[str]]:
    return json.loads((path or EVAL_DATA / "system_prompts_heldout.json").read_text("utf-8"))


def first_per_language(items: list[Any], limit: int | None) -> list[Any]:
    """The first `limit` items of each language, in file order (all when limit is None)."""
    if limit is None:
        return items
    seen: dict[str, int] = {}
    kept = []
    for item in items:
        seen[item.lang] = seen.get(item.lang, 0) + 1
        if seen[item.lang] <= limit:
            kept.append(item)
    return kept


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.casefold()).strip()


def mentions(answer: str, terms: list[str]) -> bool:
    said = normalise(answer)
    return any(normalise(t) in said for t in terms if t.strip())


def identity_hit(answer: str, question: IdentityQuestion, identity: Identity) -> bool:
    """A hit names what the question asks for: the name, the author, or either."""
    if question.expect == "name":
        return mentions(answer, identity.names)
    if question.expect == "author":
        return mentions(answer, identity.authors)
    return mentions(answer, identity.names + identity.authors)


def general_correct(answer: str, question: GeneralQuestion) -> bool:
    return mentions(answer, question.answers)


def answer_all(
    model: Any, tokenizer: Any, conversations: list[Messages], max_new_tokens: int, batch: int = 16
) -> list[str]:
    """Greedy answers, in batches of similar prompt length (less padding)."""
    params = SamplingParams(max_new_tokens=max_new_tokens)
    order = sorted(range(len(conversations)), key=lambda i: len(str(conversations[i])))
    answers: list[str] = [""] * len(conversations)
    for start in range(0, len(order), batch):
        chunk = order[start : start + batch]
        done = generate(model, tokenizer, [conversations[i] for i in chunk], params)
        for i, completion in zip(chunk, done):
            answers[i] = completion.text
    return answers


def conditions(
    train_system: str | None, default_system: str | None, heldout: dict[str, list[str]]
) -> dict[str, Any]:
    """System-prompt conditions: a fixed prompt, or per-language lists cycled over questions."""
    found: dict[str, Any] = {"none": None}
    if train_system:
        found["training system prompt"] = train_system
    if default_system:
        found["model default"] = default_system
    found["held-out system prompts"] = heldout
    return found


def system_for(condition: Any, question: IdentityQuestion, index: int) -> str | None:
    if isinstance(condition, dict):
        pool = condition.get(question.lang) or [p for ps in condition.values() for p in ps]
        return pool[index % len(pool)]
    return condition


def with_system(system: str | None, query: str) -> Messages:
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": query}]


def score_identity(
    model: Any,
    tokenizer: Any,
    questions: list[IdentityQuestion],
    identity: Identity,
    systems: dict[str, Any],
    report: EvalReport,
    max_new_tokens: int = 48,
) -> None:
    for name, condition in systems.items():
        prompts = [
            with_system(system_for(condition, q, i), q.query) for i, q in enumerate(questions)
        ]
        answers = answer_all(model, tokenizer, prompts, max_new_tokens)
        counts: dict[str, list[int]] = {}
        for prompt, question, answer in zip(prompts, questions, answers):
            hit = identity_hit(answer, question, identity)
            tally = counts.setdefault(question.lang, [0, 0])
            tally[0] += int(hit)
            tally[1] += 1
            report.samples.append(
                {
                    "condition": name,
                    "lang": question.lang,
                    "system": prompt[0]["content"] if prompt[0]["role"] == "system" else None,
                    "query": question.query,
                    "answer": answer,
                    "hit": hit,
                }
            )
        report.identity_counts[name] = counts
        report.identity[name] = {lang: hit / total for lang, (hit, total) in counts.items()}


def base_context(model: Any):
    """Run the base model: adapters off for a PEFT model."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()


@torch.no_grad()
def mean_kl(model: Any, tokenizer: Any, prompts: list[Messages], base_answers: list[str]) -> float:
    """Mean over answer tokens of KL(base || tuned), teacher-forced on the base's answers."""
    from selftune.infer.generate import render_prompt

    total, count = 0.0, 0
    device = next(model.parameters()).device
    for prompt, answer in zip(prompts, base_answers):
        prefix = render_prompt(tokenizer, prompt)
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not answer_ids:
            continue
        ids = torch.tensor([prefix + answer_ids], device=device)
        tuned = model(input_ids=ids).logits[0, len(prefix) - 1 : -1].float().log_softmax(-1)
        with base_context(model):
            base = model(input_ids=ids).logits[0, len(prefix) - 1 : -1].float().log_softmax(-1)
        total += float((base.exp() * (base - tuned)).sum())
        count += len(answer_ids)
    return total / max(1, count)


def score_retention(
    model: Any,
    tokenizer: Any,
    questions: list[GeneralQuestion],
    report: EvalReport,
    max_new_tokens: int = 48,
) -> None:
    prompts = [with_system(None, q.question) for q in questions]
    with base_context(model):
        base_answers = answer_all(model, tokenizer, prompts, max_new_tokens)
    tuned_answers = answer_all(model, tokenizer, prompts, max_new_tokens)
    base_ok = [general_correct(a, q) for a, q in zip(base_answers, questions)]
    kept = [ok and general_correct(a, q) for ok, a, q in zip(base_ok, tuned_answers, questions)]
    report.base_correct = sum(base_ok)
    report.tuned_correct_of_base = sum(kept)
    report.retention = sum(kept) / sum(base_ok) if any(base_ok) else None
    report.kl = mean_kl(model, tokenizer, prompts, base_answers)
    for q, b, t in zip(questions, base_answers, tuned_answers):
        report.samples.append(
            {
                "condition": "general",
                "lang": q.lang,
                "query": q.question,
                "base_answer": b,
                "answer": t,
            }
        )


def markdown(report: EvalReport) -> str:
    langs = sorted({lang for rates in report.identity.values() for lang in rates})
    lines = [
        "| identity hit rate | " + " | ".join(langs) + " |",
        "| --- | " + " | ".join("---" for _ in langs) + " |",
    ]
    for condition, rates in report.identity.items():
        counts = report.identity_counts.get(condition, {})
        cells = [
            f"{rates[lang]:.0%} ({counts[lang][0]}/{counts[lang][1]})" if lang in rates else "-"
            for lang in langs
        ]
        lines.append(f"| {condition} | " + " | ".join(cells) + " |")
    if report.retention is not None or report.base_correct == 0:
        retention = "n/a" if report.retention is None else f"{report.retention:.0%}"
        lines += [
            "",
            "| retention | value |",
            "| --- | --- |",
            f"| general answers kept | {retention} ({report.tuned_correct_of_base}/{report.base_correct} the base got right) |",
            f"| mean per-token KL from base | {report.kl:.4f} |" if report.kl is not None else "",
        ]
    return "\n".join(line for line in lines if line is not None)


def run_eval(
    loaded: Any,
    identity: Identity,
    train_system: str | None,
    default_system: str | None,
    args: EvalArgs,
) -> EvalReport:
    """Identity hit rate under each system-prompt condition and retention of `loaded` (a
    models.load.Loaded), on the shipped held-out sets or --identity_file / --general_file."""
    identity_file = Path(args.identity_file) if args.identity_file else None
    general_file = Path(args.general_file) if args.general_file else None
    for path in (identity_file, general_file):
        if path is not None and not path.is_file():
            raise SelftuneError(f"{path}: no such file")
    report = EvalReport()
    systems = conditions(train_system, default_system, load_heldout_systems())
    log.info("identity: %d conditions", len(systems))
    score_identity(
        loaded.model,
        loaded.tokenizer,
        first_per_language(load_identity_questions(identity_file), args.eval_limit),
        identity,
        systems,
        report,
        args.max_new_tokens,
    )
    log.info("retention on general questions")
    score_retention(
        loaded.model,
        loaded.tokenizer,
        first_per_language(load_general_questions(general_file), args.eval_limit),
        report,
        args.max_new_tokens,
    )
    return report
