"""Documents to text sections: Markdown, plain text, HTML, PDF and DOCX, each section with the
path of headings above it (and its page, for PDF)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from selftune.data.formats import read_text
from selftune.errors import SelftuneError

SUFFIXES = (".md", ".markdown", ".txt", ".html", ".htm", ".pdf", ".docx")
MD_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


@dataclass
class Section:
    headings: tuple[str, ...]  # from the document's title down to this section's own heading
    text: str
    page: int | None = None  # 1-based, PDF only


@dataclass
class Document:
    path: Path
    title: str
    sections: list[Section] = field(default_factory=list)


def parse(path: Path) -> Document:
    """The file's sections; a file that cannot be read or parsed raises one SelftuneError that
    names it."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise SelftuneError(f"{path}: unsupported file type; use {', '.join(SUFFIXES)}")
    try:
        if suffix == ".pdf":
            sections = pdf_sections(path)
        elif suffix == ".docx":
            sections = docx_sections(path)
        elif suffix in (".html", ".htm"):
            sections = html_sections(read_text(path))
        elif suffix == ".txt":
            sections = text_sections(read_text(path))
        else:
            sections = markdown_sections(read_text(path))
    except SelftuneError:
        raise
    except Exception as exc:  # each library has its own errors for a broken file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SelftuneError(f"{path}: cannot read this {suffix[1:]} file: {first}") from exc
    sections = [s for s in sections if s.text.strip()]
    title = next((s.headings[0] for s in sections if s.headings), "") or path.stem
    return Document(path, title, sections)


def heading_sections(blocks: list[tuple[int, str] | str]) -> list[Section]:
    """Blocks in reading order, each a heading (level, text) or a paragraph, as sections: the
    paragraphs under one heading, with the path of headings above it."""
    sections: list[Section] = []
    path: list[tuple[int, str]] = []
    paragraphs: list[str] = []

    def flush() -> None:
        if paragraphs:
            sections.append(Section(tuple(t for _, t in path), "\n\n".join(paragraphs)))
            paragraphs.clear()

    for block in blocks:
        if isinstance(block, tuple):
            flush()
            level, text = block
            path = [(lvl, t) for lvl, t in path if lvl < level] + [(level, text)]
        elif block.strip():
            paragraphs.append(block.strip())
    flush()
    return sections


def markdown_sections(text: str) -> list[Section]:
    blocks: list[tuple[int, str] | str] = []
    paragraph: list[str] = []
    in_code = False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            in_code = not in_code
        heading = None if in_code else MD_HEADING.match(line)
        if heading or not line.strip():
            if paragraph:
                blocks.append("\n".join(paragraph))
                paragraph = []
            if heading:
                blocks.append((len(heading.group(1)), heading.group(2)))
            continue
        paragraph.append(line)
    if paragraph:
        blocks.append("\n".join(paragraph))
    return heading_sections(blocks)


def text_sections(text: str) -> list[Section]:
    """Plain text: paragraphs split at blank lines; a short first line is the title."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    blocks: list[tuple[int, str] | str] = list(paragraphs)
    if paragraphs and "\n" not in paragraphs[0] and len(paragraphs[0]) <= 120:
        blocks[0] = (1, paragraphs[0])
    return heading_sections(blocks)


class HtmlBlocks(HTMLParser):
    """Headings and text blocks of an HTML page; scripts, styles and navigation left out."""

    SKIP = {"script", "style", "nav", "head", "template", "noscript"}
    BLOCK = {"p", "li", "div", "td", "th", "pre", "blockquote", "section", "article", "br", "tr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[tuple[int, str] | str] = []
        self.text: list[str] = []
        self.skipping = 0
        self.heading: int | None = None

    def flush(self) -> None:
        text = re.sub(r"\s+", " ", "".join(self.text)).strip()
        self.text = []
        if text:
            self.blocks.append((self.heading, text) if self.heading else text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.SKIP:
            self.skipping += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self.flush()
            self.heading = int(tag[1])
        elif tag in self.BLOCK:
            self.flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif re.fullmatch(r"h[1-6]", tag) or tag in self.BLOCK:
            self.flush()
            if tag.startswith("h") and len(tag) == 2:
                self.heading = None

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.text.append(data)


def html_sections(text: str) -> list[Section]:
    parser = HtmlBlocks()
    parser.feed(text)
    parser.close()
    parser.flush()
    return heading_sections(parser.blocks)


def pdf_sections(path: Path) -> list[Section]:
    """One section per page (PDF text has no reliable headings); the document's title, where
    the file names one, heads every page."""
    from pypdf import PdfReader

    reader = PdfReader(str(path), strict=False)
    title = (reader.metadata.title if reader.metadata else None) or path.stem
    sections = []
    for number, page in enumerate(reader.pages, start=1):
        text = page.extract_text() or ""
        paragraphs = [unwrap(p) for p in re.split(r"\n\s*\n", text) if p.strip()]
        sections.append(Section((title,), "\n\n".join(paragraphs), page=number))
    return sections


def unwrap(text: str) -> str:
    """A PDF paragraph's lines joined: nothing between two CJK characters, a space elsewhere."""
    text = re.sub(r"(?<=[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef])\n(?=[\u4e00-\u9fff])", "", text)
    return re.sub(r"\s*\n\s*", " ", text).strip()


def docx_sections(path: Path) -> list[Section]:
    """Paragraphs under the headings that Word's heading styles (Title, Heading N) mark."""
    import docx

    blocks: list[tuple[int, str] | str] = []
    for paragraph in docx.Document(str(path)).paragraphs:
        style = (paragraph.style.name if paragraph.style is not None else "") or ""
        text = paragraph.text.strip()
        if not text:
            continue
        if style == "Title":
            blocks.append((1, text))
        elif match := re.fullmatch(r"Heading (\d)", style):
            blocks.append((int(match.group(1)) + 1, text))
        else:
            blocks.append(text)
    return heading_sections(blocks)


def collect_files(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """The supported files under `paths` (folders walked, hidden entries skipped), and one
    line per path that is missing or of a type that cannot be indexed."""
    files: list[Path] = []
    problems: list[str] = []
    for path in paths:
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                hidden = any(part.startswith(".") for part in child.relative_to(path).parts)
                if child.is_file() and not hidden and child.suffix.lower() in SUFFIXES:
                    files.append(child)
        elif path.is_file():
            if path.suffix.lower() in SUFFIXES:
                files.append(path)
            else:
                problems.append(f"{path}: unsupported file type; use {', '.join(SUFFIXES)}")
        else:
            problems.append(f"{path}: no such file or folder")
    return files, problems
