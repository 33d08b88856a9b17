"""Read a local model's weight files into the page cache from the start of a run.

From a cold page cache, the tutorial's run on an H200 spent its first 7 s importing torch and
transformers and encoding the data, and only then read 15 GB of weights in 10-12 s
(bench/README.md). A thread that starts at once has the kernel read the weight files into
the page cache (`sendfile` to /dev/null: no copy into this process, the GIL released) while
those imports run, so the load finds them cached. `posix_fadvise(WILLNEED)` would be the plain
way, but recent kernels cap it at the readahead window (8 MB of a 2 GB file here). Skipped where
the weights would not fit in half the memory the system has available: they would only push
each other out.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)
CHUNK = 64 << 20  # bytes per sendfile call (an exit waits for one at most)


def weight_files(folder: Path) -> list[Path]:
    """The files `from_pretrained` reads the weights from, in shard order: safetensors where
    there are any, else PyTorch's .bin files."""
    for pattern in ("*.safetensors", "*.bin"):
        files = sorted(p for p in folder.glob(pattern) if p.is_file())
        if files:
            return files
    return []


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes; None where the system does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def read_into_cache(files: list[Path]) -> None:
    with open(os.devnull, "wb") as sink:
        for path in files:
            try:
                with open(path, "rb") as source:
                    size, offset = os.fstat(source.fileno()).st_size, 0
                    while offset < size:
                        sent = os.sendfile(sink.fileno(), source.fileno(), offset, CHUNK)
                        if sent == 0:
                            break
                        offset += sent
            except OSError as exc:  # the load reports what is wrong with the file
                log.debug("readahead of %s stopped: %s", path, exc)
                return


def start_readahead(spec: str | None) -> threading.Thread | None:
    """Start reading the weights of `spec` into the page cache, where it names a local model
    folder (hub ids and GGUF files are resolved later, by the load); the thread, or None where
    nothing is read."""
    if not spec or not hasattr(os, "sendfile"):
        return None
    from selftune.models import embedded_cache_dir, is_embedded, is_model_folder

    folder = embedded_cache_dir() if is_embedded(spec) else Path(spec).expanduser()
    if not is_model_folder(folder):
        return None
    files = weight_files(folder)
    total = sum(p.stat().st_size for p in files)
    available = available_memory()
    if not files or available is None or total > available // 2:
        return None
    thread = threading.Thread(
        target=read_into_cache, args=(files,), name="selftune-readahead", daemon=True
    )
    thread.start()
    return thread
