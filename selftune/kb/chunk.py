"""Sections to chunks of a few hundred tokens that end at paragraph or sentence ends, in Chinese
and English, each prefixed by its heading path so that it reads alone."""

from __future__ import annotations

import re
from dataclasses import dataclass

from selftune.kb.parse import Document

MAX_UNITS = 220  # about tokens: one per CJK character, one per other word
OVERLAP_UNITS = 40  # the previous chunk's last sentences that start the next one
# a sentence ends at 。！？； (and their full-width kin), or at . ! ? ; followed by a space or
# the end; a blank line ends a paragraph
SENTENCE_END = re.compile(
    r"(?:[。！？；!?;]|\.(?=[\s\"'”’)]|$))[\"'”’」』)]*(?:[ \t]*\n\s*\n)?|\n\s*\n"
)
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")
WORD = re.compile(r"[^\W\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]+")


@dataclass(frozen=True)
class Chunk:
    text: str  # heading path, a newline, then the passage
    heading: str  # "Title > Section > Subsection"
    page: int | None
    section: int  # index of the section in the document
    start: int  # character span of the passage within its section's text
    end: int


def units(text: str) -> int:
    """A token count that needs no tokenizer: CJK characters one each, other words one each."""
    return len(CJK.findall(text)) + len(WORD.findall(text))


def sentence_spans(text: str) -> list[tuple[int, int, bool]]:
    """(start, end, ends_paragraph) of each sentence, whitespace trimmed."""
    spans = []
    start = 0
    for match in SENTENCE_END.finditer(text):
        end = match.end()
        spans.append((start, end, "\n" in match.group(0)))
        start = end
    if start < len(text):
        spans.append((start, len(text), True))
    trimmed = []
    for start, end, paragraph in spans:
        piece = text[start:end]
        lead = len(piece) - len(piece.lstrip())
        tail = len(piece.rstrip())
        if tail > lead:
            trimmed.append((start + lead, start + tail, paragraph))
    return trimmed


def split_long(text: str, start: int, end: int, limit: int) -> list[tuple[int, int]]:
    """A sentence longer than `limit` units, cut into pieces of at most `limit` units."""
    pieces = []
    piece_start, count = start, 0
    for index in range(start, end):
        count += 1 if CJK.match(text[index]) or (text[index].isspace() and index > start) else 0
        if count >= limit:
            pieces.append((piece_start, index + 1))
            piece_start, count = index + 1, 0
    if piece_start < end:
        pieces.append((piece_start, end))
    return pieces


def pack(text: str, max_units: int, overlap: int) -> list[tuple[int, int]]:
    """Character spans of chunks over `text`: whole sentences up to `max_units`, a chunk ended
    early at a paragraph end when it is at least half full; each chunk after the first starts
    with the last sentences of the one before, up to `overlap` units."""
    sentences: list[tuple[int, int, bool]] = []
    for start, end, paragraph in sentence_spans(text):
        if units(text[start:end]) > max_units:
            pieces = split_long(text, start, end, max_units)
            sentences += [(s, e, paragraph and e == end) for s, e in pieces]
        else:
            sentences.append((start, end, paragraph))
    chunks: list[tuple[int, int]] = []
    current: list[tuple[int, int, bool]] = []
    size = 0
    for sentence in sentences:
        n = units(text[sentence[0] : sentence[1]])
        if current and size + n > max_units:
            chunks.append((current[0][0], current[-1][1]))
            carried: list[tuple[int, int, bool]] = []
            carried_size = 0
            for previous in reversed(current):
                m = units(text[previous[0] : previous[1]])
                if carried_size + m > overlap or carried_size + m + n > max_units:
                    break
                carried.insert(0, previous)
                carried_size += m
            current, size = carried, carried_size
        current.append(sentence)
        size += n
        if sentence[2] and size >= max_units // 2:
            chunks.append((current[0][0], current[-1][1]))
            current, size = [], 0
    if current:
        chunks.append((current[0][0], current[-1][1]))
    return chunks


def chunk_document(
    document: Document, max_units: int = MAX_UNITS, overlap: int = OVERLAP_UNITS
) -> list[Chunk]:
    chunks = []
    for index, section in enumerate(document.sections):
        heading = " > ".join(section.headings) or document.title
        for start, end in pack(section.text, max_units, overlap):
            passage = section.text[start:end]
            chunks.append(Chunk(f"{heading}\n{passage}", heading, section.page, index, start, end))
    return chunks
