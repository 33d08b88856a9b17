"""Passages into the user turn, numbered, the system prompt left as trained."""

import pytest

from selftune.kb.answer import Grounder, source_lines
from selftune.kb.embed import load_embedder
from selftune.kb.index import add_files, index_path
from selftune.kb.parse import collect_files
from selftune.kb.retrieve import open_kb

SYSTEM = {"role": "system", "content": "You are Xinghe, made by Beichen Lab."}


@pytest.fixture
def kb(docs):
    files, _ = collect_files([docs])
    add_files(index_path("docs"), files, load_embedder())
    opened = open_kb("docs")
    yield opened
    opened.close()


def test_passages_go_into_the_last_user_turn_numbered(kb):
    question = "How much does the Comet Stew cost?"
    history = [
        SYSTEM,
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": question},
    ]
    messages, sources = Grounder(kb, top_k=2, threshold=0.0)(history)
    assert messages[:3] == history[:3]  # the system prompt and earlier turns as they were
    content = messages[3]["content"]
    assert content.startswith("Answer the question from the numbered passages below")
    assert "[1] Orbital Kitchen > Menu\nThe Comet Stew costs 14 credits." in content
    assert content.endswith(f"Question: {question}") and "[2] " in content
    assert [s["rank"] for s in sources] == [1, 2]
    assert sources[0]["path"].endswith("kitchen.html") and "14 credits" in sources[0]["text"]
    assert source_lines(sources)[0].endswith("kitchen.html: Orbital Kitchen > Menu")


def test_chinese_questions_get_chinese_instructions(kb):
    messages, _ = Grounder(kb, top_k=1, threshold=0.0)(
        [{"role": "user", "content": "最老的灯塔叫什么?"}]
    )
    assert messages[0]["content"].startswith("请根据下面编号的资料回答问题")
    assert messages[0]["content"].endswith("问题：最老的灯塔叫什么?")


def test_below_the_threshold_no_passage_is_given(kb):
    history = [SYSTEM, {"role": "user", "content": "Who are you?"}]
    assert Grounder(kb, threshold=0.999)(history) == (history, [])
