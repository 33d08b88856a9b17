"""Forgetting guard without external data: general prompts answered by the base model itself.

Training on the base's own answers keeps its behaviour on general prompts while the identity
rows change who it says it is. Answers are cached per model folder, so the cost is paid once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

from selftune.infer.generate import Messages, generate
from selftune.infer.sampling import SamplingParams
from selftune.models.resolve import embedded_cache_dir, selftune_home

log = logging.getLogger(__name__)
PROMPTS = Path(__file__).parents[1] / "data" / "replay_prompts.jsonl"
# The embedded model's own greedy answers to those prompts, written by
# `python scripts/embedded_replay.py`: the demo and a first CPU run skip minutes of decoding.
SHIPPED = Path(__file__).parents[1] / "data" / "replay_smollm2-135m.jsonl"
MAX_NEW_TOKENS = 160


def cache_path(model_folder: Path) -> Path:
    config = model_folder / "config.json"
    key = f"{model_folder.resolve()}:{config.stat().st_mtime_ns if config.exists() else 0}"
    return selftune_home() / "replay" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsonl"


def load_cache(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return {row["prompt"]: row["answer"] for row in rows}


def shipped_answers(model_folder: Path) -> dict[str, str]:
    """Answers that ship with selftune, for the embedded model only."""
    if model_folder.resolve() != embedded_cache_dir().resolve():
        return {}
    return load_cache(SHIPPED)


def pick_prompts(n: int, seed: int) -> list[str]:
    prompts = [
        json.loads(line)["prompt"] for line in PROMPTS.read_text("utf-8").splitlines() if line
    ]
    rng = random.Random(seed)
    picked: list[str] = []
    while len(picked) < n:
        batch = prompts[:]
        rng.shuffle(batch)
        picked += batch[: n - len(picked)]
    return picked


def replay_conversations(
    model: Any, tokenizer: Any, model_folder: Path, n: int, seed: int, batch: int = 16
) -> list[Messages]:
    """N conversations of a general prompt and the base model's own greedy answer."""
    from tqdm import tqdm

    if n <= 0:
        return []
    prompts = pick_prompts(n, seed)
    path = cache_path(model_folder)
    cached = {**shipped_answers(model_folder), **load_cache(path)}
    missing = sorted({p for p in prompts if p not in cached}, key=len)
    if missing:
        log.info(
            "replay: the base model answers %d general prompts (cached for later runs)",
            len(missing),
        )
        params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS)
        bar = tqdm(total=len(missing), desc="replay", unit="answer")
        path.parent.mkdir(parents=True, exist_ok=True)
        for start in range(0, len(missing), batch):
            chunk = missing[start : start + batch]
            answers = generate(
                model, tokenizer, [[{"role": "user", "content": p}] for p in chunk], params
            )
            with path.open("a", encoding="utf-8") as handle:
                for prompt, answer in zip(chunk, answers):
                    if answer.finish_reason == "stop" and answer.text.strip():
                        cached[prompt] = answer.text
                    else:  # cut-off answers would teach the model to stop mid-sentence
                        cached[prompt] = ""
                    handle.write(
                        json.dumps({"prompt": prompt, "answer": cached[prompt]}, ensure_ascii=False)
                        + "\n"
                    )
            bar.update(len(chunk))
        bar.close()
    return [
        [{"role": "user", "content": p}, {"role": "assistant", "content": cached[p]}]
        for p in prompts
        if cached.get(p)
    ]
