"""Render the shipped knowledge-base set's PDF and DOCX documents from their Markdown sources
(selftune/kb/shipped/docs_sources/NAME.pdf.md -> docs/NAME.pdf). Run once by a developer; the
outputs are committed. PDFs use DejaVu Sans for Latin text and WenQuanYi Micro Hei for Chinese
(Debian: fonts-dejavu-core, fonts-wqy-microhei), embedded as subsets.

    python scripts/make_kb_docs.py
"""

from __future__ import annotations

import re
from pathlib import Path

SHIPPED = Path(__file__).resolve().parents[1] / "selftune" / "kb" / "shipped"
FONTS = {
    "latin": "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "cjk": "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
}


def blocks(markdown: str) -> list[tuple[int, str]]:
    """(heading level or 0 for a paragraph, text)."""
    found = []
    for part in re.split(r"\n\s*\n", markdown.strip()):
        part = part.strip()
        heading = re.match(r"^(#{1,6})\s+(.*)$", part)
        found.append(
            (len(heading.group(1)), heading.group(2))
            if heading
            else (0, " ".join(part.splitlines()))
        )
    return found


def make_pdf(source: Path, target: Path) -> None:
    from fpdf import FPDF

    parts = blocks(source.read_text("utf-8"))
    chinese = bool(re.search(r"[\u4e00-\u9fff]", source.read_text("utf-8")))
    pdf = FPDF()
    pdf.set_title(parts[0][1])
    pdf.set_creation_date(__import__("datetime").datetime(2026, 12, 8))
    pdf.add_font("body", fname=FONTS["cjk" if chinese else "latin"])
    pdf.add_page()
    for level, text in parts:
        pdf.set_font("body", size={0: 11, 1: 18, 2: 14}.get(level, 12))
        pdf.multi_cell(0, 7 if level == 0 else 10, text)
        pdf.ln(3)
    pdf.output(str(target))


def make_docx(source: Path, target: Path) -> None:
    import docx

    document = docx.Document()
    document.core_properties.title = blocks(source.read_text("utf-8"))[0][1]
    for level, text in blocks(source.read_text("utf-8")):
        if level == 1:
            document.add_heading(text, level=0)
        elif level:
            document.add_heading(text, level=level - 1)
        else:
            document.add_paragraph(text)
    document.save(str(target))


def main() -> None:
    for source in sorted((SHIPPED / "docs_sources").glob("*.md")):
        target = SHIPPED / "docs" / source.name.removesuffix(".md")
        (make_pdf if target.suffix == ".pdf" else make_docx)(source, target)
        print(f"wrote {target.relative_to(SHIPPED.parents[2])}")


if __name__ == "__main__":
    main()
