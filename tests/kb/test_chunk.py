"""Chunks end at paragraph or sentence ends, in Chinese and English, and read alone."""

from pathlib import Path

from selftune.kb.chunk import chunk_document, pack, sentence_spans, units
from selftune.kb.parse import Document, Section

ZH = "星河港建于1872年。它位于北岸！港口有三座灯塔？每座灯塔高四十米；最老的一座叫白石塔。"
EN = "The harbor opened in 1872. It lies on the north shore! Are there lighthouses? Yes: three."


def test_sentences_end_at_chinese_and_english_marks():
    assert [ZH[s:e] for s, e, _ in sentence_spans(ZH)] == [
        "星河港建于1872年。", "它位于北岸！", "港口有三座灯塔？", "每座灯塔高四十米；", "最老的一座叫白石塔。",
    ]  # fmt: skip
    assert [EN[s:e] for s, e, _ in sentence_spans(EN)] == [
        "The harbor opened in 1872.", "It lies on the north shore!", "Are there lighthouses?",
        "Yes: three.",
    ]  # fmt: skip


def test_units_count_cjk_characters_and_words():
    assert units("星河港 is 3 words") == 3 + 3


def test_chunks_end_at_sentence_ends_and_overlap(tmp_path):
    for text in (ZH * 6, (EN + " ") * 6):
        spans = pack(text, max_units=40, overlap=12)
        assert len(spans) > 2
        ends = {e for _, e, _ in sentence_spans(text)}
        starts = {s for s, _, _ in sentence_spans(text)}
        assert all(end in ends and start in starts for start, end in spans)
        assert all(units(text[s:e]) <= 40 for s, e in spans)
        assert all(b[0] < a[1] for a, b in zip(spans, spans[1:]))  # each overlaps the last
        covered = set()
        for s, e in spans:
            covered.update(range(s, e))
        assert all(i in covered for i in range(len(text)) if not text[i].isspace())


def test_a_paragraph_end_closes_a_half_full_chunk():
    text = "One sentence here. " * 6 + "\n\n" + "Another one there. " * 6
    spans = pack(text, max_units=30, overlap=0)
    assert text[spans[0][0] : spans[0][1]].endswith("One sentence here.")


def test_each_chunk_reads_alone_with_its_heading_path():
    document = Document(Path("guide.md"), "Guide", [Section(("Guide", "Setup"), EN, page=2)])
    (chunk,) = chunk_document(document)
    assert chunk.text == f"Guide > Setup\n{EN}" and chunk.page == 2
    assert (chunk.start, chunk.end) == (0, len(EN))
