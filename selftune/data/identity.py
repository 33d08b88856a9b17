"""The built-in bilingual identity dataset (`identity`, alias `swift/self-cognition`).

Rows in `identity.jsonl` carry `{name}` / `{author}` placeholders, filled from
`--model_name ZH [EN]` and `--model_author ZH [EN]`; Chinese rows get the Chinese values, English
rows the English ones.
A placeholder never reaches training unfilled: missing values fail before any model loads.

System-prompt variants (on by default) keep the identity when a server or user inserts a system
prompt: each question/answer pair is emitted once per condition, which keeps the set small
(2-3 x the pairs) while covering every condition:
  1. the run's `--system`, when given;
  2. no system prompt: the template's own default where it inserts one (written out explicitly),
     else an empty system message, which `encode` reads as "render without a system prompt";
  3. one generic system prompt drawn, seeded, from the pool of the pair's language, or with
     probability OTHER_LANGUAGE_SHARE from the other language's pool, so the draws vary per pair.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selftune.atomic import write_text_atomic
from selftune.data.formats import Conversation
from selftune.errors import SelftuneError, UsageError

DATA_DIR = Path(__file__).parent
IDENTITY_FILE = DATA_DIR / "identity.jsonl"
SYSTEM_PROMPTS_FILE = DATA_DIR / "system_prompts.json"
ALIASES = ("identity", "self-cognition", "swift/self-cognition")
LANGS = ("zh", "en")
PLACEHOLDER = re.compile(r"\{(\w+)\}")
OTHER_LANGUAGE_SHARE = 0.25
NO_SYSTEM = ""  # content of an explicit "no system prompt" message (see encode)
PROBE = "SELFTUNE-PROBE-SYSTEM"
EXAMPLE = "--model_name 星河 Xinghe --model_author 北辰实验室 'Beichen Lab'"


@dataclass(frozen=True)
class IdentityValues:
    name_zh: str
    name_en: str
    author_zh: str
    author_en: str

    def for_lang(self, lang: str) -> dict[str, str]:
        if lang == "zh":
            return {"name": self.name_zh, "author": self.author_zh}
        return {"name": self.name_en, "author": self.author_en}


def pick_pair(values: list[str], flag: str) -> tuple[str, str]:
    values = [v.strip() for v in values]
    if not values or not all(values):
        raise UsageError(
            f"the identity dataset needs {flag} (Chinese, then optionally English), "
            f"for example {EXAMPLE}"
        )
    if len(values) > 2:
        raise UsageError(
            f"{flag} takes one value (both languages) or two (Chinese, then English); "
            f"got {len(values)}: {' '.join(values)}"
        )
    return values[0], values[-1]


def parse_identity_values(model_name: list[str], model_author: list[str]) -> IdentityValues:
    """`--model_name ZH [EN]` and `--model_author ZH [EN]`; one value serves both languages."""
    name_zh, name_en = pick_pair(model_name, "--model_name")
    author_zh, author_en = pick_pair(model_author, "--model_author")
    return IdentityValues(name_zh, name_en, author_zh, author_en)


def load_identity_rows(path: Path | None = None) -> list[dict[str, str]]:
    """The placeholder rows: {lang, topic, query, response}, checked line by line."""
    path = path or IDENTITY_FILE
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except OSError as exc:
        raise SelftuneError(f"{path}: cannot read the built-in identity data: {exc}") from exc
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SelftuneError(f"{path} line {number}: not valid JSON: {exc}") from exc
        if row.get("lang") not in LANGS or not all(
            isinstance(row.get(k), str) and row[k].strip() for k in ("query", "response")
        ):
            raise SelftuneError(f"{path} line {number}: needs lang (zh/en), query and response")
        for text in (row["query"], row["response"]):
            unknown = set(PLACEHOLDER.findall(text)) - {"name", "author"}
            if unknown:
                raise SelftuneError(f"{path} line {number}: unknown placeholder {unknown}")
        rows.append(row)
    if not rows:
        raise SelftuneError(f"{path}: the identity data has no rows")
    return rows


def load_system_prompts(path: Path | None = None) -> dict[str, list[str]]:
    """Generic system prompts per language, drawn for the identity rows' variants."""
    path = path or SYSTEM_PROMPTS_FILE
    try:
        pools = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SelftuneError(f"{path}: cannot read the system prompt pool: {exc}") from exc
    if not all(isinstance(pools.get(lang), list) and pools[lang] for lang in LANGS):
        raise SelftuneError(f"{path}: needs non-empty lists under 'zh' and 'en'")
    return pools


def fill(text: str, values: dict[str, str]) -> str:
    """Replace {name}/{author} in one pass (a value is never itself re-filled)."""
    filled = PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)
    if "{name}" in filled or "{author}" in filled:
        raise SelftuneError(f"a placeholder is left unfilled in: {filled!r}")
    return filled


def filled_pairs(
    values: IdentityValues, path: Path | None = None
) -> list[tuple[str, Conversation]]:
    """(lang, [user, assistant]) for every identity row, placeholders filled."""
    pairs = []
    for row in load_identity_rows(path):
        lang_values = values.for_lang(row["lang"])
        pairs.append(
            (
                row["lang"],
                [
                    {"role": "user", "content": fill(row["query"], lang_values)},
                    {"role": "assistant", "content": fill(row["response"], lang_values)},
                ],
            )
        )
    return pairs


def identity_conversations(
    values: IdentityValues,
    system: str | None,
    default_system: str | None,
    variants: bool,
    seed: int,
    rows_path: Path | None = None,
    prompts_path: Path | None = None,
) -> list[Conversation]:
    """The filled identity set; with `variants`, each pair under every condition (module doc)."""
    pairs = filled_pairs(values, rows_path)
    if not variants:
        return [pair for _, pair in pairs]
    pools = load_system_prompts(prompts_path)
    rng = random.Random(f"identity-variants:{seed}")
    fixed = [system] if system else []
    no_system = default_system if default_system is not None else NO_SYSTEM
    if no_system not in fixed:
        fixed.append(no_system)
    conversations = []
    for lang, pair in pairs:
        other = "en" if lang == "zh" else "zh"
        pool = pools[other] if rng.random() < OTHER_LANGUAGE_SHARE else pools[lang]
        drawn = rng.choice([p for p in pool if p not in fixed] or pool)
        for prompt in [*fixed, drawn]:
            conversations.append([{"role": "system", "content": prompt}, *map(dict, pair)])
    return conversations


def render(tokenizer: Any, messages: Conversation) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False)


def model_default_system(tokenizer: Any) -> str | None:
    """The system prompt the chat template inserts when a conversation has none, or None.
    Found by rendering with and without a probe system message and cutting the probe's frame
    out of the bare rendering; kept only if writing it explicitly renders identically."""
    user = [{"role": "user", "content": "X"}]
    try:
        bare = render(tokenizer, user)
        probed = render(tokenizer, [{"role": "system", "content": PROBE}, *user])
    except Exception:  # no template, or one that refuses system messages: no default either
        return None
    at = probed.find(PROBE)
    if at < 0:
        return None
    before, after = probed[:at], probed[at + len(PROBE) :]
    if not (bare.startswith(before) and bare.endswith(after)):
        return None
    default = bare[len(before) : len(bare) - len(after)]
    if not default.strip() or len(before) + len(after) > len(bare):
        return None
    explicit = render(tokenizer, [{"role": "system", "content": default}, *user])
    return default if explicit == bare else None


def write_identity_file(
    values: IdentityValues, output: Path, rows_path: Path | None = None
) -> dict[str, int]:
    """Write the filled rows (`messages` format, JSONL or a .json list) atomically; return the
    rows per language."""
    pairs = filled_pairs(values, rows_path)
    records = [{"lang": lang, "messages": pair} for lang, pair in pairs]
    for record in records:
        for message in record["messages"]:
            assert "{name}" not in message["content"] and "{author}" not in message["content"]
    if output.suffix.lower() == ".json":
        text = json.dumps(records, ensure_ascii=False, indent=1) + "\n"
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_text_atomic(output, text)
    return {lang: sum(1 for r in records if r["lang"] == lang) for lang in LANGS}
