"""Each format to sections with their heading paths."""

import pytest

from selftune.errors import SelftuneError
from selftune.kb.parse import collect_files, parse


def test_markdown_sections_carry_their_heading_path(docs):
    document = parse(docs / "harbor.md")
    assert document.title == "星河港手册"
    assert [s.headings for s in document.sections] == [
        ("星河港手册", "历史"),
        ("星河港手册", "灯塔"),
    ]
    assert document.sections[0].text.startswith("星河港建于1872年。")


def test_html_keeps_headings_and_text_and_drops_scripts_and_navigation(docs):
    document = parse(docs / "kitchen.html")
    assert document.title == "Orbital Kitchen"
    texts = {s.headings[-1]: s.text for s in document.sections}
    assert texts == {
        "Menu": "The Comet Stew costs 14 credits. It is served on Tuesdays.",
        "Staff": "The head cook is Mira Vantablack.",
    }


def test_plain_text_takes_its_first_short_line_as_title(docs):
    document = parse(docs / "league.txt")
    assert document.title == "Harbor League"
    assert "Port Ellis" in document.sections[0].text


def test_pdf_pages_are_sections_with_page_numbers(docs):
    document = parse(docs / "mission.pdf")
    assert document.title == "Mission Gray Heron"
    assert [s.page for s in document.sections] == [1, 2]
    assert "Quillfeather" in document.sections[1].text


def test_docx_headings_come_from_word_styles(docs):
    document = parse(docs / "lumen.docx")
    assert document.title == "Lumen Tool Guide"
    headings = [s.headings for s in document.sections]
    assert headings == [("Lumen Tool Guide", "Install"), ("Lumen Tool Guide", "配置")]
    assert "7391" in document.sections[1].text


def test_a_corrupt_pdf_is_one_line_naming_it(docs):
    broken = docs / "broken.pdf"
    broken.write_bytes((docs / "mission.pdf").read_bytes()[:200])
    with pytest.raises(SelftuneError) as caught:
        parse(broken)
    assert str(caught.value).startswith(f"{broken}: cannot read this pdf file")
    assert "\n" not in str(caught.value)


def test_folders_are_walked_and_unsupported_files_named(docs, tmp_path):
    (docs / ".hidden.md").write_text("# no", "utf-8")
    (docs / "image.png").write_bytes(b"\x89PNG")
    stray = tmp_path / "notes.rtf"
    stray.write_text("x")
    files, problems = collect_files([docs, stray, tmp_path / "gone.md"])
    assert [f.name for f in files] == ["harbor.md", "kitchen.html", "league.txt", "lumen.docx",
                                       "mission.pdf"]  # fmt: skip
    assert problems[0].startswith(f"{stray}: unsupported file type")
    assert problems[1] == f"{tmp_path / 'gone.md'}: no such file or folder"
