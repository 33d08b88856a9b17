"""The shipped bilingual set: retrieval figures of a knowledge base built from it."""

import json

import pytest

from selftune.cli import main
from selftune.kb.evaluate import SHIPPED, load_questions


def test_the_shipped_set_is_whole():
    questions = load_questions()
    answerable = [q for q in questions if q.doc]
    assert len(questions) == 100 and len(answerable) == 80
    assert {q.lang for q in questions} == {"zh", "en"}
    formats = {(SHIPPED / "docs" / q.doc).suffix for q in answerable}
    assert formats == {".md", ".txt", ".html", ".pdf", ".docx"}
    assert all((SHIPPED / "docs" / q.doc).is_file() for q in answerable)


@pytest.mark.slow  # embeds the 20 shipped documents
def test_kb_eval_finds_the_right_document(capsys, tmp_path):
    assert main(["kb", "add", "shipped", str(SHIPPED / "docs")]) == 0
    capsys.readouterr()
    output = tmp_path / "eval.json"
    assert main(["kb", "eval", "shipped", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    figures = json.loads(output.read_text())["retrieval"]
    assert "| cross-lingual |" in printed
    assert figures["all"]["questions"] == 80
    assert figures["all"]["recall@5"] >= 0.9 and figures["all"]["mrr"] >= 0.85
    assert figures["zh"]["recall@5"] >= 0.95
