"""One SQLite file per knowledge base: documents (path, content hash, title), their chunks (text,
heading path, page, character span, vector) and a full-text table of the chunks' words for BM25.
`add` runs in one transaction: a killed `kb add` leaves the index as it was before."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from selftune.errors import SelftuneError, UsageError
from selftune.kb.chunk import chunk_document
from selftune.kb.embed import Embedder
from selftune.kb.parse import parse
from selftune.kb.words import index_words
from selftune.models.resolve import selftune_home

log = logging.getLogger(__name__)
SUFFIX = ".sqlite"
EMBED_BATCH = 16  # the embedder's peak memory grows with its batch, its speed does not
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, hash TEXT NOT NULL, title TEXT NOT NULL,
    added REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY, doc_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    ord INTEGER NOT NULL, heading TEXT NOT NULL, text TEXT NOT NULL, page INTEGER,
    section INTEGER NOT NULL, start INTEGER NOT NULL, stop INTEGER NOT NULL, vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id);
CREATE VIRTUAL TABLE IF NOT EXISTS chunk_words USING fts5(words);
"""


def index_path(name: str) -> Path:
    """A name under the selftune home (~/.cache/selftune/kb/NAME.sqlite), or a path to the
    index file itself (anything with a / or ending in .sqlite / .db)."""
    if "/" in name or name.endswith((SUFFIX, ".db")):
        return Path(name).expanduser()
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise UsageError(f"knowledge base name '{name}': use letters, digits, '-', '_' and '.'")
    return selftune_home() / "kb" / f"{name}{SUFFIX}"


def connect(path: Path, create: bool = False) -> sqlite3.Connection:
    if not create and not path.is_file():
        raise SelftuneError(f"{path}: no such knowledge base (selftune kb add NAME FILES...)")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # transactions by hand; a server queries from its worker threads (kb.answer locks)
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(SCHEMA)
    except sqlite3.DatabaseError as exc:
        raise SelftuneError(f"{path}: not a knowledge base index: {exc}") from exc
    return conn


def meta(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT key, value FROM meta"))


def check_embedder(conn: sqlite3.Connection, path: Path, embedder: Embedder) -> None:
    """An index answers only the embedder that built it: vectors of another are meaningless."""
    saved = meta(conn)
    if "embedder" not in saved:
        return
    if (saved["embedder"], int(saved["dim"])) != (embedder.name, embedder.dim):
        raise SelftuneError(
            f"{path} was built with the embedder {saved['embedder']} ({saved['dim']} dimensions, "
            f"version {saved['version']}), not {embedder.name} ({embedder.dim}); pass "
            f"--embedder {saved['embedder']}, or build a new knowledge base"
        )


@dataclass
class AddReport:
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # one line per file that could not be read
    chunks: int = 0


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def add_files(
    path: Path,
    files: list[Path],
    embedder: Embedder,
    prune_under: list[Path] | None = None,
) -> AddReport:
    """Index `files` into the knowledge base at `path`: unchanged files (same content hash) are
    skipped, changed ones replace their chunks; with `prune_under`, documents under those
    folders that are gone, or no longer among `files`, are dropped. One transaction."""
    from tqdm import tqdm

    conn = connect(path, create=True)
    check_embedder(conn, path, embedder)
    report = AddReport()
    try:
        conn.execute("BEGIN IMMEDIATE")
        for key, value in (
            ("embedder", embedder.name),
            ("version", embedder.version),
            ("dim", str(embedder.dim)),
        ):
            conn.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, value))
        for file in tqdm(files, desc="kb add", unit="file", file=sys.stderr, disable=not files):
            add_one(conn, file.resolve(), embedder, report)
        if prune_under is not None:
            prune(conn, {str(f.resolve()) for f in files}, prune_under, report)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        conn.close()
    return report


def add_one(conn: sqlite3.Connection, file: Path, embedder: Embedder, report: AddReport) -> None:
    digest = file_hash(file)
    row = conn.execute("SELECT id, hash FROM documents WHERE path = ?", (str(file),)).fetchone()
    if row is not None and row[1] == digest:
        report.unchanged.append(str(file))
        return
    try:
        document = parse(file)
    except SelftuneError as exc:
        report.failed.append(str(exc))
        return
    chunks = chunk_document(document)
    vectors = np.concatenate(
        [
            embedder.passages([c.text for c in chunks[i : i + EMBED_BATCH]])
            for i in range(0, len(chunks), EMBED_BATCH)
        ]
        or [np.zeros((0, embedder.dim), dtype=np.float32)]
    )
    if row is not None:
        delete_document(conn, row[0])
    doc_id = conn.execute(
        "INSERT INTO documents (path, hash, title, added) VALUES (?, ?, ?, ?)",
        (str(file), digest, document.title, time.time()),
    ).lastrowid
    for order, (chunk, vector) in enumerate(zip(chunks, vectors)):
        chunk_id = conn.execute(
            "INSERT INTO chunks (doc_id, ord, heading, text, page, section, start, stop, vector) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                doc_id,
                order,
                chunk.heading,
                chunk.text,
                chunk.page,
                chunk.section,
                chunk.start,
                chunk.end,
                vector.astype(np.float32).tobytes(),
            ),
        ).lastrowid
        conn.execute(
            "INSERT INTO chunk_words (rowid, words) VALUES (?, ?)",
            (chunk_id, " ".join(index_words(chunk.text))),
        )
    (report.replaced if row is not None else report.added).append(str(file))
    report.chunks += len(chunks)


def delete_document(conn: sqlite3.Connection, doc_id: int) -> None:
    conn.execute(
        "DELETE FROM chunk_words WHERE rowid IN (SELECT id FROM chunks WHERE doc_id = ?)",
        (doc_id,),
    )
    conn.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
    conn.execute("DELETE FROM documents WHERE id = ?", (doc_id,))


def prune(conn: sqlite3.Connection, kept: set[str], folders: list[Path], report: AddReport) -> None:
    """Drop documents whose file is gone, and those under `folders` not among `kept`."""
    roots = [f.resolve() for f in folders]
    for doc_id, doc_path in conn.execute("SELECT id, path FROM documents").fetchall():
        file = Path(doc_path)
        inside = any(root == file or root in file.parents for root in roots)
        if not file.is_file() or (inside and doc_path not in kept):
            delete_document(conn, doc_id)
            report.removed.append(doc_path)


@dataclass
class IndexSummary:
    path: Path
    documents: int
    chunks: int
    embedder: str


def summary(path: Path) -> IndexSummary:
    conn = connect(path)
    try:
        (documents,) = conn.execute("SELECT count(*) FROM documents").fetchone()
        (chunks,) = conn.execute("SELECT count(*) FROM chunks").fetchone()
        return IndexSummary(path, documents, chunks, meta(conn).get("embedder", "-"))
    finally:
        conn.close()


def list_indexes() -> list[IndexSummary]:
    folder = selftune_home() / "kb"
    return [summary(p) for p in sorted(folder.glob(f"*{SUFFIX}"))] if folder.is_dir() else []


def remove_index(path: Path) -> None:
    if not path.is_file():
        raise SelftuneError(f"{path}: no such knowledge base")
    for extra in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{extra}").unlink(missing_ok=True)
