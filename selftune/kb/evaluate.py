"""How well a knowledge base finds the right document: recall@k and MRR over a question set
(`{"id", "lang", "question", "doc", "answers"}` per line, `doc` null for questions the documents
do not answer), per language and across languages."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selftune.errors import SelftuneError
from selftune.kb.retrieve import KnowledgeBase

SHIPPED = Path(__file__).parent / "shipped"
CJK = re.compile(r"[\u4e00-\u9fff]")


@dataclass
class Question:
    id: str
    lang: str
    question: str
    doc: str | None
    answers: list[str]


@dataclass
class RetrievalReport:
    k: int
    groups: dict[str, dict[str, float]] = field(default_factory=dict)  # group -> metric -> value
    misses: list[str] = field(default_factory=list)  # ids whose document was not in the top k


def load_questions(path: Path | None = None) -> list[Question]:
    path = path or SHIPPED / "qa.jsonl"
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            questions.append(
                Question(
                    str(row["id"]),
                    str(row["lang"]),
                    str(row["question"]),
                    row.get("doc"),
                    list(row.get("answers") or []),
                )
            )
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SelftuneError(f"{path} line {number}: not a question row: {exc}") from exc
    return questions


def document_language(kb: KnowledgeBase, name: str) -> str:
    """zh or en, by the script of the document's text."""
    text = "".join(
        t
        for (t,) in kb.conn.execute(
            "SELECT c.text FROM chunks c JOIN documents d ON d.id = c.doc_id "
            "WHERE d.path LIKE ? LIMIT 3",
            (f"%/{name}",),
        )
    )
    return "zh" if len(CJK.findall(text)) > len(text) / 10 else "en"


def retrieval_report(kb: KnowledgeBase, questions: list[Question], k: int = 5) -> RetrievalReport:
    """recall@k and MRR of the answering document, over all answerable questions and per
    group: zh, en, cross-lingual (question and document in different languages)."""
    report = RetrievalReport(k)
    ranks: dict[str, list[float]] = {}
    languages: dict[str, str] = {}
    for question in questions:
        if question.doc is None:
            continue
        if question.doc not in languages:
            languages[question.doc] = document_language(kb, question.doc)
        hits = kb.search(question.question, top_k=k)
        found = [i for i, h in enumerate(hits, 1) if Path(h.path).name == question.doc]
        reciprocal = 1.0 / found[0] if found else 0.0
        if not found:
            report.misses.append(question.id)
        groups = ["all", question.lang]
        if languages[question.doc] != question.lang:
            groups.append("cross-lingual")
        for group in groups:
            ranks.setdefault(group, []).append(reciprocal)
    for group, values in ranks.items():
        report.groups[group] = {
            "questions": len(values),
            f"recall@{k}": round(sum(v > 0 for v in values) / len(values), 4),
            "mrr": round(sum(values) / len(values), 4),
        }
    return report


def table(report: RetrievalReport) -> str:
    lines = [f"| group | questions | recall@{report.k} | MRR |", "| --- | --- | --- | --- |"]
    for group, values in report.groups.items():
        lines.append(
            f"| {group} | {values['questions']} | {values[f'recall@{report.k}']:.3f} | "
            f"{values['mrr']:.3f} |"
        )
    return "\n".join(lines)


def as_json(report: RetrievalReport) -> dict[str, Any]:
    return {"k": report.k, "retrieval": report.groups, "misses": report.misses}
