"""`selftune kb` as a user runs it: add, ls, search, rm, and one line per bad input."""

import json

from selftune.cli import main


def test_add_ls_search_rm(capsys, docs, kb_home):
    assert main(["kb", "add", "notes", str(docs)]) == 0
    out = capsys.readouterr().out
    assert "5 added, 0 replaced, 0 unchanged, 0 removed, 0 failed" in out
    assert main(["kb", "ls"]) == 0
    assert capsys.readouterr().out.startswith("notes\t5 documents\t")
    assert main(["kb", "search", "notes", "Comet", "Stew", "price", "--json", "true"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["path"].endswith("kitchen.html") and hits[0]["heading"].endswith("Menu")
    assert set(hits[0]) == {"rank", "path", "title", "heading", "text", "page", "score",
                            "similarity"}  # fmt: skip
    assert main(["kb", "rm", "notes"]) == 0
    assert not list((kb_home / "kb").glob("notes*"))


def test_bad_input_is_one_line(capsys, docs, tmp_path):
    assert main(["kb", "search", "nothing-here", "q"]) == 1
    assert "no such knowledge base" in capsys.readouterr().err
    assert main(["kb", "frobnicate"]) == 2
    assert "usage: selftune kb add NAME PATH..." in capsys.readouterr().err
    assert main(["kb", "add", "bad name", str(docs)]) == 2
    assert "knowledge base name 'bad name'" in capsys.readouterr().err
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 broken")
    assert main(["kb", "add", "notes", str(docs), str(tmp_path / "gone.md")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert any("broken.pdf: cannot read this pdf file" in line for line in err)
    assert any("gone.md: no such file or folder" in line for line in err)
