"""`selftune infer`: terminal chat (as `swift infer`) and batch inference into JSONL."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from selftune.atomic import write_jsonl_atomic
from selftune.infer.generate import Messages, generate
from selftune.infer.sampling import SamplingParams

# messages -> (messages with retrieved passages, their sources): kb.answer.Grounder
Grounding = Callable[[list[dict[str, str]]], tuple[list[dict[str, str]], list[dict[str, Any]]]]
COMMANDS = ("exit", "quit", "clear", "reset-system", "multi-line", "single-line")
HELP = (
    "Commands: `clear` forgets the conversation, `reset-system` sets a new system prompt, "
    "`multi-line` reads input until a line ends with `#` (`single-line` switches back), "
    "`exit` or `quit` leaves."
)


@dataclass
class ChatSession:
    """One terminal conversation: its system prompt and the turns so far."""

    system: str | None = None
    history: Messages = field(default_factory=list)

    def messages(self, query: str) -> Messages:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history + [{"role": "user", "content": query}]


def read_query(stdin: TextIO, stdout: TextIO, multi_line: bool) -> str | None:
    """One user message; None at end of input."""
    stdout.write("<<< ")
    stdout.flush()
    if not multi_line:
        line = stdin.readline()
        return None if line == "" else line.rstrip("\n")
    lines: list[str] = []
    while True:
        line = stdin.readline()
        if line == "":
            return "\n".join(lines) if lines else None
        line = line.rstrip("\n")
        if not lines and line.strip().lower() in COMMANDS:
            return line
        if line.endswith("#"):
            lines.append(line[:-1])
            return "\n".join(lines)
        lines.append(line)


def chat_loop(
    model: Any,
    tokenizer: Any,
    params: SamplingParams,
    system: str | None,
    stream: bool = True,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
    forward_kwargs: dict[str, Any] | None = None,
    ground: Grounding | None = None,
) -> None:
    """Read messages until `exit`/EOF, answering each with the whole conversation as context;
    with `ground`, from the passages it retrieves, which are listed after the answer."""
    session = ChatSession(system=system)
    multi_line = False
    if stdin.isatty():
        stdout.write(HELP + "\n")
    while True:
        query = read_query(stdin, stdout, multi_line)
        if query is None:
            stdout.write("\n")
            return
        command = query.strip().lower()
        if command in ("exit", "quit"):
            return
        if command == "clear":
            session.history.clear()
            stdout.write("The conversation is cleared.\n")
            continue
        if command == "reset-system":
            stdout.write("System prompt (empty for the model's default): ")
            stdout.flush()
            session.system = stdin.readline().strip() or None
            session.history.clear()
            continue
        if command in ("multi-line", "single-line"):
            multi_line = command == "multi-line"
            stdout.write("Multi-line mode: end your message with `#`.\n" if multi_line else "")
            continue
        if not query.strip():
            continue

        def show(_row: int, piece: str) -> None:
            stdout.write(piece)
            stdout.flush()

        messages, sources = ground(session.messages(query)) if ground else (None, [])
        (answer,) = generate(
            model,
            tokenizer,
            [messages or session.messages(query)],
            params,
            on_text=show if stream else None,
            forward_kwargs=forward_kwargs,
        )
        if not stream:
            stdout.write(answer.text)
        stdout.write("\n")
        if ground is not None:
            from selftune.kb.answer import source_lines

            lines = source_lines(sources) or ["(no passage of the knowledge base is about this)"]
            stdout.write("".join(f"    {line}\n" for line in lines))
        stdout.flush()
        session.history += [
            {"role": "user", "content": query},
            {"role": "assistant", "content": answer.text},
        ]


def query_of(messages: Messages) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def split_reference(conversation: Messages) -> tuple[Messages, str | None]:
    """A dataset row becomes a prompt (up to its last user turn) and its reference answer."""
    if conversation and conversation[-1]["role"] == "assistant":
        return conversation[:-1], conversation[-1]["content"]
    return conversation, None


def with_system(messages: Messages, system: str | None) -> Messages:
    if system and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}] + messages
    return messages


def batch_infer(
    model: Any,
    tokenizer: Any,
    conversations: list[Messages],
    params: SamplingParams,
    system: str | None,
    result_path: Path,
    batch_size: int = 8,
    forward_kwargs: dict[str, Any] | None = None,
    ground: Grounding | None = None,
) -> list[dict[str, Any]]:
    """Answer every row, write one JSON line per row, and return the rows (with `ground`, each
    with the `sources` its answer was given)."""
    from tqdm import tqdm

    rows: list[dict[str, Any]] = []
    items = [split_reference(c) for c in conversations]
    bar = tqdm(total=len(items), desc="infer", unit="row", file=sys.stderr)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        prompts = [with_system(prompt, system) for prompt, _ in chunk]
        grounded = [ground(p) for p in prompts] if ground else [(p, None) for p in prompts]
        questions = [query_of(p) for p in prompts]
        prompts = [p for p, _ in grounded]
        began = time.perf_counter()
        answers = generate(model, tokenizer, prompts, params, forward_kwargs=forward_kwargs)
        elapsed = time.perf_counter() - began
        for prompt, (_, reference), answer, query, (_, sources) in zip(
            prompts, chunk, answers, questions, grounded
        ):
            rows.append(
                {
                    "query": query,
                    "response": answer.text,
                    "labels": reference,
                    "messages": prompt,
                    "prompt_tokens": answer.prompt_tokens,
                    "completion_tokens": answer.completion_tokens,
                    "finish_reason": answer.finish_reason,
                    "latency_s": round(elapsed, 4),
                    **({"sources": sources} if ground else {}),
                }
            )
        bar.update(len(chunk))
    bar.close()
    write_jsonl_atomic(result_path, rows)
    return rows
