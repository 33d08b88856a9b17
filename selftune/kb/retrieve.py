"""Hybrid search over one knowledge base: BM25 over words (SQLite FTS5) and exact cosine search
over the chunk vectors (numpy, fine up to about 100k chunks), fused by reciprocal rank."""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from selftune.kb.embed import Embedder, load_embedder
from selftune.kb.index import check_embedder, connect, index_path, meta
from selftune.kb.words import query_words

CANDIDATES = 50  # from each ranking, before fusion
RRF_K = 60  # reciprocal rank fusion: score = sum of weight / (RRF_K + rank)
# BM25 counts twice: its matches on names (and their pinyin) are precise where the small
# embedder is weak, across languages above all (bench/README.md, "Knowledge base")
BM25_WEIGHT = 2.0


@dataclass
class Hit:
    """One retrieved passage, as answers cite it."""

    rank: int
    path: str
    title: str
    heading: str
    text: str  # the passage, without its heading line
    page: int | None
    score: float  # the fused score
    similarity: float  # cosine between the query and the passage: the relevance threshold's

    def as_source(self) -> dict[str, Any]:
        return asdict(self)


class KnowledgeBase:
    """An index opened for queries: its vectors held in memory, its embedder loaded once."""

    def __init__(self, name: str, embedder: Embedder | str | None = None):
        self.path = index_path(name)
        self.conn = connect(self.path)
        saved = meta(self.conn)
        if "embedder" not in saved:
            raise ValueError(f"{self.path}: the knowledge base is empty")
        if not isinstance(embedder, Embedder):
            embedder = load_embedder(embedder or saved["embedder"])
        check_embedder(self.conn, self.path, embedder)
        self.embedder = embedder
        rows = self.conn.execute("SELECT id, vector FROM chunks ORDER BY id").fetchall()
        self.ids = np.array([r[0] for r in rows], dtype=np.int64)
        self.vectors = (
            np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(
                len(rows), embedder.dim
            )
            if rows
            else np.zeros((0, embedder.dim), dtype=np.float32)
        )

    def close(self) -> None:
        self.conn.close()

    def dense(self, query_vector: np.ndarray, n: int) -> list[tuple[int, float]]:
        similarities = self.vectors @ query_vector
        n = min(n, len(similarities))
        best = np.argpartition(-similarities, n - 1)[:n]  # no full sort of every chunk
        order = best[np.argsort(-similarities[best])]
        return [(int(self.ids[i]), float(similarities[i])) for i in order]

    def bm25(self, query: str, n: int) -> list[int]:
        terms = query_words(query)
        if not terms:
            return []
        match = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
        try:
            rows = self.conn.execute(
                "SELECT rowid FROM chunk_words WHERE chunk_words MATCH ? "
                "ORDER BY bm25(chunk_words) LIMIT ?",
                (match, n),
            ).fetchall()
        except sqlite3.OperationalError:  # a query FTS5 cannot parse: dense search alone
            return []
        return [r[0] for r in rows]

    def search(self, query: str, top_k: int = 5) -> list[Hit]:
        """The `top_k` passages, best first."""
        if len(self.ids) == 0:
            return []
        query_vector = self.embedder.queries([query])[0]
        dense = self.dense(query_vector, CANDIDATES)
        similarity = dict(dense)
        fused: dict[int, float] = {}
        rankings = ((1.0, [i for i, _ in dense]), (BM25_WEIGHT, self.bm25(query, CANDIDATES)))
        for weight, ranking in rankings:
            for rank, chunk_id in enumerate(ranking):
                fused[chunk_id] = fused.get(chunk_id, 0.0) + weight / (RRF_K + rank + 1)
        best = sorted(fused, key=lambda i: -fused[i])[:top_k]
        missing = [i for i in best if i not in similarity]
        if missing:  # BM25 found them beyond the dense candidates: their cosine all the same
            positions = np.searchsorted(self.ids, missing)
            for chunk_id, pos in zip(missing, positions):
                similarity[chunk_id] = float(self.vectors[pos] @ query_vector)
        return [self.hit(rank, i, fused[i], similarity[i]) for rank, i in enumerate(best, 1)]

    def hit(self, rank: int, chunk_id: int, score: float, similarity: float) -> Hit:
        path, title, heading, text, page = self.conn.execute(
            "SELECT d.path, d.title, c.heading, c.text, c.page FROM chunks c "
            "JOIN documents d ON d.id = c.doc_id WHERE c.id = ?",
            (chunk_id,),
        ).fetchone()
        passage = text.split("\n", 1)[1] if "\n" in text else text
        return Hit(rank, path, title, heading, passage, page, round(score, 6), round(similarity, 4))


def open_kb(name: str, embedder: str | None = None) -> KnowledgeBase:
    """The knowledge base NAME (or at a path), for queries; errors name it."""
    from selftune.errors import SelftuneError

    try:
        return KnowledgeBase(name, embedder)
    except ValueError as exc:
        raise SelftuneError(str(exc)) from exc
