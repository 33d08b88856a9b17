"""Answers grounded in a knowledge base: the passages retrieved for the user's last message go
into that message, numbered, with an instruction to cite them as [n]; the system prompt stays
as trained, so the identity holds. Below the relevance threshold no passage is given."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any

from selftune.kb.retrieve import Hit, KnowledgeBase

Messages = list[dict[str, str]]
TOP_K = 4
# the top passage's cosine below which the documents are taken not to be about the question
THRESHOLD = 0.80
CJK = re.compile(r"[\u4e00-\u9fff]")
INSTRUCTION = {
    "en": (
        "Answer the question from the numbered passages below and cite the passages you use "
        "as [n]. If they do not answer it, say that the documents do not cover it."
    ),
    "zh": "请根据下面编号的资料回答问题，并用 [n] 标注所引用的资料。如果资料中没有答案，请说明文档中没有相关内容。",
}
QUESTION = {"en": "Question: ", "zh": "问题："}


def grounded_question(question: str, hits: list[Hit]) -> str:
    """The user turn that carries the passages: instruction, numbered passages, question."""
    lang = "zh" if CJK.search(question) else "en"
    passages = "\n\n".join(f"[{i}] {h.heading}\n{h.text}" for i, h in enumerate(hits, start=1))
    return f"{INSTRUCTION[lang]}\n\n{passages}\n\n{QUESTION[lang]}{question}"


@dataclass
class Grounder:
    """messages -> (the messages with the passages in the last user turn, their sources)."""

    kb: KnowledgeBase
    top_k: int = TOP_K
    threshold: float = THRESHOLD
    lock: threading.Lock = field(default_factory=threading.Lock)  # one query at a time

    def __call__(self, messages: Messages) -> tuple[Messages, list[dict[str, Any]]]:
        last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last is None:
            return messages, []
        question = messages[last]["content"]
        with self.lock:
            found = self.kb.search(question, self.top_k)
        hits = [h for h in found if h.similarity >= self.threshold]
        if not hits:
            return messages, []
        grounded = {"role": "user", "content": grounded_question(question, hits)}
        sources = [{**h.as_source(), "rank": i} for i, h in enumerate(hits, start=1)]
        return messages[:last] + [grounded] + messages[last + 1 :], sources


def source_lines(sources: list[dict[str, Any]]) -> list[str]:
    """How a terminal shows an answer's sources, one line each."""
    lines = []
    for source in sources:
        page = f", page {source['page']}" if source.get("page") else ""
        lines.append(f"[{source['rank']}] {source['path']}{page}: {source['heading']}")
    return lines
