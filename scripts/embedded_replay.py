"""Write selftune/data/replay_smollm2-135m.jsonl: the embedded model's own greedy answers to
every replay prompt, so `--replay` on the embedded model needs no decoding on first use.

    .venv/bin/python scripts/embedded_replay.py
"""

from __future__ import annotations

import json

from selftune.generate import SamplingParams, generate
from selftune.replay import MAX_NEW_TOKENS, PROMPTS, SHIPPED

from selftune.models import load_model


def main() -> None:
    model, tokenizer, _ = load_model("smollm2-135m", device="cpu")
    prompts = [
        json.loads(line)["prompt"] for line in PROMPTS.read_text("utf-8").splitlines() if line
    ]
    rows = []
    for start in range(0, len(prompts), 16):
        chunk = prompts[start : start + 16]
        done = generate(
            model,
            tokenizer,
            [[{"role": "user", "content": p}] for p in chunk],
            SamplingParams(max_new_tokens=MAX_NEW_TOKENS),
        )
        for prompt, answer in zip(chunk, done):
            keep = answer.finish_reason == "stop" and answer.text.strip()
            rows.append({"prompt": prompt, "answer": answer.text if keep else ""})
        print(f"{len(rows)}/{len(prompts)}", flush=True)
    SHIPPED.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )


if __name__ == "__main__":
    main()
