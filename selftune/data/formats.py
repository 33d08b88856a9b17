"""Read dataset files (.json, .jsonl, .csv, hub ids) and turn each row into one conversation.

A conversation is a plain list of `{"role": "system" | "user" | "assistant", "content": str}`,
usable as it is with `tokenizer.apply_chat_template`. The row format (alpaca, `messages`,
ShareGPT, query/response) is recognised from each row's fields, so a file may mix formats.
Errors name the file, the row (JSONL/CSV: 1-based line; JSON: 0-based index) and the field.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from selftune.errors import SelftuneError

log = logging.getLogger(__name__)

Conversation = list[dict[str, str]]
TaggedMessage = tuple[dict[str, str], str]  # (message, the field it came from)

ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}
SUFFIXES = (".json", ".jsonl", ".csv")
JSON_CELLS = ("history", "messages", "conversations")  # CSV cells that hold JSON
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?")
EXPECTED = (
    "expected one of: messages (OpenAI roles), conversations (ShareGPT from/value), "
    "instruction/input/output (alpaca), query/response"
)


class RowError(ValueError):
    """A problem with one row; the caller adds file and row to the message."""


class Row(list):
    """A conversation (a list of messages) that remembers where it was read ("FILE line N"),
    so that later steps can name it."""

    origin: str = ""


def with_origin(messages: list[dict[str, str]], origin: str) -> Row:
    row = Row(messages)
    row.origin = origin
    return row


def origin_of(conversation: Conversation) -> str:
    """Where a conversation was read ("FILE line N"), or "" (built-in rows)."""
    return getattr(conversation, "origin", "")


def as_text(value: Any, field: str, coerce: bool = False) -> str | None:
    """A field's text: strings as they are, OpenAI text parts joined; numbers only with
    `coerce` (--coerce_text), since a number where text belongs is more often a broken export
    than an answer."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" for p in value
    ):
        return "".join(str(p.get("text", "")) for p in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if coerce:
            return str(value)
        raise RowError(
            f"field '{field}' must be text, not the number {value!r} "
            "(pass --coerce_text true to train on numbers as text)"
        )
    raise RowError(f"field '{field}' must be text, not {type(value).__name__}")


def tag(role: str, value: Any, field: str, coerce: bool = False) -> TaggedMessage:
    return {"role": role, "content": as_text(value, field, coerce)}, field


def from_pairs(
    row: dict[str, Any], query_key: str, response_key: str, coerce: bool = False
) -> list[TaggedMessage]:
    """alpaca and query/response rows: optional system, history [[q, a], ...], then the turn."""
    system = as_text(row.get("system"), "system", coerce)
    tagged = [tag("system", system, "system")] if system else []
    history = row.get("history") or []
    if not isinstance(history, list):
        raise RowError("field 'history' must be a list of [question, answer] pairs")
    for i, pair in enumerate(history):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RowError(f"history[{i}] must be a [question, answer] pair")
        tagged.append(tag("user", pair[0], f"history[{i}][0]", coerce))
        tagged.append(tag("assistant", pair[1], f"history[{i}][1]", coerce))
    query = as_text(row.get(query_key), query_key, coerce)
    if query_key == "instruction":  # alpaca: the optional input follows the instruction
        extra = as_text(row.get("input"), "input", coerce)
        if extra:
            query = f"{query}\n{extra}" if query else extra
    tagged.append(tag("user", query, query_key))
    tagged.append(tag("assistant", row.get(response_key), response_key, coerce))
    return tagged


def from_turns(row: dict[str, Any], key: str, coerce: bool = False) -> list[TaggedMessage]:
    """`messages` and ShareGPT `conversations`: role/content or from/value entries; a
    top-level `system` field counts when the turns do not start with one."""
    turns = row[key]
    if not isinstance(turns, list):
        raise RowError(f"field '{key}' must be a list of turns")
    tagged: list[TaggedMessage] = []
    for i, turn in enumerate(turns):
        field = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise RowError(f"{field} must be an object with role/content or from/value")
        speaker = turn.get("role", turn.get("from"))
        if speaker not in ROLES:
            raise RowError(f"{field}: unknown role {speaker!r} (use {', '.join(ROLES)})")
        tagged.append(tag(ROLES[speaker], turn.get("content", turn.get("value")), field, coerce))
    system = as_text(row.get("system"), "system", coerce)
    if system and not (tagged and tagged[0][0]["role"] == "system"):
        tagged.insert(0, tag("system", system, "system"))
    return tagged


def to_tagged(row: dict[str, Any], coerce: bool = False) -> list[TaggedMessage]:
    if "messages" in row:
        return from_turns(row, "messages", coerce)
    if "conversations" in row:
        return from_turns(row, "conversations", coerce)
    if "instruction" in row:
        return from_pairs(row, "instruction", "output", coerce)
    if "query" in row:
        return from_pairs(row, "query", "response", coerce)
    raise RowError(
        f"unknown row format; fields seen: {', '.join(map(str, row)) or 'none'}; {EXPECTED}"
    )


def to_conversation(
    row: dict[str, Any], require_answer: bool, coerce_text: bool = False
) -> Conversation:
    """One row as a checked conversation. Without `require_answer` (batch inference) a row may
    end on its question; an empty answer at the end is then dropped."""
    tagged = to_tagged(row, coerce_text)
    if not require_answer:
        while (
            tagged
            and tagged[-1][0]["role"] == "assistant"
            and not (tagged[-1][0]["content"] or "").strip()
        ):
            tagged.pop()
    for i, (message, field) in enumerate(tagged):
        text = message["content"]
        if message["role"] == "system" and i > 0:
            raise RowError(f"{field}: a system message must come first")
        if message["role"] == "assistant" and not (text or "").strip():
            raise RowError(f"no assistant text in '{field}'")
        if message["role"] == "user" and text is None:
            raise RowError(f"no user text in '{field}'")
    roles = [m["role"] for m, _ in tagged]
    if "user" not in roles:
        raise RowError("no user turn")
    if require_answer and "assistant" not in roles:
        raise RowError("no assistant text")
    return [m for m, _ in tagged]


def parse_json_cells(row: dict[str, Any]) -> dict[str, Any]:
    """CSV cells are strings: empty ones are absent, and history/messages cells hold JSON."""
    parsed: dict[str, Any] = {}
    for key, value in row.items():
        if key is None or value is None or value == "":
            continue
        if key in JSON_CELLS:
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise RowError(f"field '{key}' is not valid JSON: {exc.msg}") from exc
        parsed[key] = value
    return parsed


def jsonl_rows(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    # split on "\n" only: str.splitlines would also split on U+2028, legal inside JSON strings
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise SelftuneError(f"{path} line {number}: not valid JSON: {exc}") from exc


def json_rows(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a .json file that holds JSON lines
            yield from jsonl_rows(path, text)
            return
        raise SelftuneError(f"{path}: not valid JSON: {exc}") from exc
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) != 1:
            raise SelftuneError(
                f"{path}: expected a list of rows, or an object with one list of rows; "
                f"found keys: {', '.join(data) or 'none'}"
            )
        data = data[lists[0]]
    if not isinstance(data, list):
        raise SelftuneError(f"{path}: expected a list of rows, not {type(data).__name__}")
    for index, row in enumerate(data):
        yield f"[{index}]", row


def csv_rows(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for row in reader:
        where = f"line {reader.line_num}"
        try:
            yield where, parse_json_cells(row)
        except RowError as exc:
            raise SelftuneError(f"{path} {where}: {exc}") from exc


def convert_rows(
    source: str, rows: Iterator[tuple[str, Any]], require_answer: bool, coerce_text: bool = False
) -> list[Conversation]:
    conversations: list[Conversation] = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise SelftuneError(
                f"{source} {where}: a row must be an object, not {type(row).__name__}"
            )
        try:
            conversation = to_conversation(row, require_answer, coerce_text)
            conversations.append(with_origin(conversation, f"{source} {where}"))
        except RowError as exc:
            fields = ", ".join(map(str, row)) or "none"
            raise SelftuneError(f"{source} {where}: {exc} (row has fields: {fields})") from exc
    if not conversations:
        raise SelftuneError(f"{source}: the file has no rows")
    return conversations


def read_text(path: Path) -> str:
    """The file as UTF-8 text; a byte order mark is skipped (and said), and bytes that are not
    UTF-8 are named by line and column."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise SelftuneError(f"{path}: no such file") from exc
    except OSError as exc:
        raise SelftuneError(f"{path}: cannot read: {exc}") from exc
    if data.startswith(codecs.BOM_UTF8):
        log.info("%s: skipped the UTF-8 byte order mark at its start", path)
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SelftuneError(
            f"{path} line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column "
            f"{column}); save the file as UTF-8"
        ) from exc


def load_file(
    path: str | Path, require_answer: bool = True, coerce_text: bool = False
) -> list[Conversation]:
    """All rows of one .json/.jsonl/.csv file as conversations; every row is checked."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise SelftuneError(f"{path}: unknown file type; use {', '.join(SUFFIXES)}")
    text = read_text(path)
    reader = {".json": json_rows, ".jsonl": jsonl_rows, ".csv": csv_rows}[suffix]
    return convert_rows(str(path), reader(path, text), require_answer, coerce_text)


def is_hub_id(spec: str) -> bool:
    """`org/name` (optionally `:subset`) that is not a local path nor a file name."""
    return (
        not Path(spec).exists()
        and HUB_ID.fullmatch(spec) is not None
        and Path(spec).suffix.lower() not in SUFFIXES
    )


def load_hub(
    spec: str, require_answer: bool = True, coerce_text: bool = False
) -> list[Conversation]:
    """A Hugging Face hub dataset's train split, through the optional `datasets` package."""
    try:
        import datasets
    except ImportError as exc:
        raise SelftuneError(
            f"{spec}: not a local file; to read it as a Hugging Face hub dataset, "
            "install the `datasets` package (pip install datasets)"
        ) from exc
    repo, _, subset = spec.partition(":")
    try:
        data = datasets.load_dataset(repo, subset or None, split="train")
    except Exception as exc:  # network, missing repo, bad subset: all end the run here
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SelftuneError(f"{spec}: cannot load the hub dataset: {first}") from exc
    rows = ((f"row {i}", row) for i, row in enumerate(data))
    return convert_rows(spec, rows, require_answer, coerce_text)


def check_source(spec: str) -> None:
    """Fail early, before anything is read, when a spec is neither a file nor a hub id."""
    path = Path(spec)
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise SelftuneError(f"{spec}: unknown file type; use {', '.join(SUFFIXES)}")
        return
    if not is_hub_id(spec):
        raise SelftuneError(f"{spec}: no such file")


def load_source(
    spec: str, require_answer: bool = True, coerce_text: bool = False
) -> list[Conversation]:
    """A local file, else a hub dataset id."""
    check_source(spec)
    load = load_file if Path(spec).is_file() else load_hub
    return load(spec, require_answer, coerce_text)


def load_dataset_files(specs: list[str], require_answer: bool = False) -> list[Conversation]:
    """Several files or hub ids, concatenated in order (no sampling): `infer --val_dataset`.
    Rows may end on a question; a final assistant turn is the reference answer."""
    for spec in specs:
        check_source(spec)
    # a number here is a reference answer to compare with, not a training target
    return [conv for spec in specs for conv in load_source(spec, require_answer, True)]
