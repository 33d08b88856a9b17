"""Words for BM25 in both languages: jieba's search segmentation for Chinese (character bigrams
where jieba is missing), lower-cased words for everything else. An index also holds the pinyin
of its Chinese words and character pairs, so that an English question that writes a Chinese
name in pinyin ("Yunxi kiln") finds the passage that writes it in characters (云溪窑)."""

from __future__ import annotations

import functools
import logging
import re

# words too common to tell passages apart: left out of BM25 queries, so that a question's
# function words never outrank its content words' absence
STOPWORDS = frozenset(
    """a an the is are was were be been being am do does did of in on at to for from by with
    and or but not no what which who whom whose when where why how that this these those it its
    as about into than then there their they them he she his her we our you your i me my can
    could will would should shall may might must has have had any some all each much many""".split()
    + "的 了 是 在 吗 呢 吧 啊 和 与 或 及 什么 哪 哪个 哪里 哪些 谁 多少 几 怎么 怎样 如何 为什么 有 吗 请 问".split()
)
CJK_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
OTHER_WORD = re.compile(r"[^\W\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")


@functools.cache
def segmenter():
    """jieba's search-mode cut, or None where jieba is not installed."""
    try:
        import jieba
    except ImportError:
        return None
    jieba.setLogLevel(logging.WARNING)
    return jieba.cut_for_search


def cjk_words(run: str) -> list[str]:
    cut = segmenter()
    if cut is not None:
        return [w for w in cut(run) if w.strip()]
    if len(run) == 1:
        return [run]
    return [run[i : i + 2] for i in range(len(run) - 1)]


@functools.cache
def pinyin_of():
    """pypinyin's tone-less syllables of a string, or None where pypinyin is not installed."""
    try:
        from pypinyin import lazy_pinyin
    except ImportError:
        return None
    return lazy_pinyin


def index_words(text: str) -> list[str]:
    """The words a passage is found by: `words`, and the pinyin of each Chinese word and
    character pair."""
    found = words(text)
    pinyin = pinyin_of()
    if pinyin is None:
        return found
    spellings: set[str] = set()
    for match in CJK_RUN.finditer(text):
        run = match.group(0)
        pieces = [w for w in cjk_words(run) if len(w) > 1]
        pieces += [run[i : i + 2] for i in range(len(run) - 1)]
        spellings.update("".join(pinyin(piece)) for piece in pieces)
    return found + sorted(spellings)


def query_words(text: str) -> list[str]:
    """A query's words for BM25: its distinct words less the stopwords (all of them when it
    has nothing else)."""
    found = list(dict.fromkeys(words(text)))
    content = [w for w in found if w not in STOPWORDS]
    return content or found


def words(text: str) -> list[str]:
    """The text's words in reading order, Chinese segmented, others lower-cased."""
    found: list[str] = []
    position = 0
    for match in CJK_RUN.finditer(text):
        found += [w.lower() for w in OTHER_WORD.findall(text[position : match.start()])]
        found += cjk_words(match.group(0))
        position = match.end()
    found += [w.lower() for w in OTHER_WORD.findall(text[position:])]
    return found
