"""Documents in every supported format, made with real libraries, and a knowledge base home of
each test's own."""

from pathlib import Path

import pytest

ZH = (
    "# 星河港手册\n\n## 历史\n\n星河港建于1872年。它位于北岸！港口有三座灯塔。\n\n"
    "## 灯塔\n\n每座灯塔高四十米；最老的一座叫白石塔。白石塔的灯每晚亮到凌晨四点？不，到五点。\n"
)
EN_HTML = (
    "<html><head><title>x</title><style>p {}</style></head><body><nav>Home | About</nav>"
    "<h1>Orbital Kitchen</h1><h2>Menu</h2><p>The Comet Stew costs 14 credits. It is served on "
    "Tuesdays.</p><h2>Staff</h2><p>The head cook is Mira Vantablack.</p>"
    "<script>var hidden = 'never indexed';</script></body></html>"
)
EN_TXT = "Harbor League\n\nThe Harbor League has nine teams.\nIts final is played in Port Ellis.\n"


def make_pdf(path: Path, title: str, pages: list[str]) -> Path:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_title(title)
    pdf.set_font("Helvetica", size=12)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 8, text)
    pdf.output(str(path))
    return path


def make_docx(path: Path) -> Path:
    import docx

    document = docx.Document()
    document.add_heading("Lumen Tool Guide", level=0)
    document.add_heading("Install", level=1)
    document.add_paragraph("Lumen installs with the command lumen-setup in 12 seconds.")
    document.add_heading("配置", level=1)
    document.add_paragraph("配置文件名为 lumen.toml。默认端口是 7391。")
    document.save(str(path))
    return path


@pytest.fixture
def docs(tmp_path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "harbor.md").write_text(ZH, "utf-8")
    (folder / "kitchen.html").write_text(EN_HTML, "utf-8")
    (folder / "league.txt").write_text(EN_TXT, "utf-8")
    make_pdf(
        folder / "mission.pdf",
        "Mission Gray Heron",
        [
            "Mission Gray Heron launched on 3 May 2091.",
            "Its lander is named Quillfeather. It carried 41 kg of seeds.",
        ],
    )
    make_docx(folder / "lumen.docx")
    return folder


@pytest.fixture(autouse=True)
def kb_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("SELFTUNE_HOME", str(home))
    return home
