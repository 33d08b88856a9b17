"""Read a model's weight files (a local folder, or a hub snapshot already in the Hugging Face
cache) into the page cache from the start of a run.

From a cold page cache, a run spends its first seconds importing torch and transformers and
encoding the data, and only then reads the weights, which takes longer still (bench/README.md).
A thread that starts at once has the kernel read the weight files into
the page cache (`sendfile` to /dev/null: no copy into this process, the GIL released) while
those imports run, so the load finds them cached. `posix_fadvise(WILLNEED)` would be the plain
way, but recent kernels cap it at the readahead window, a few MB of a multi-GB file. Skipped where
the weights would not fit in half the memory the system has available: they would only push
each other out.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from selftune.models.resolve import (
    embedded_cache_dir,
    hub_id_of,
    is_embedded,
    is_model_folder,
    looks_like_path,
)

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


def cached_hub_folder(hub_id: str) -> Path | None:
    """The snapshot folder of `hub_id` already in the Hugging Face cache; None where it is not
    there (the load downloads it)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(hub_id, "config.json")
    except Exception as exc:  # a malformed id or cache: the load says what is wrong
        log.debug("no readahead for %s: %s", hub_id, exc)
        return None
    return Path(found).parent if isinstance(found, str) else None


def fits(files: list[Path]) -> bool:
    """Whether the files fit in half the memory the system has available."""
    available = available_memory()
    total = sum(p.stat().st_size for p in files)
    return bool(files) and available is not None and total <= available // 2


def read_cached_hub_model(hub_id: str) -> None:
    """Read the weights of `hub_id`'s snapshot, where the Hugging Face cache holds it."""
    folder = cached_hub_folder(hub_id)
    files = weight_files(folder) if folder is not None else []
    if fits(files):
        read_into_cache(files)


def start_readahead(spec: str | None) -> threading.Thread | None:
    """Start reading the weights of `spec` into the page cache, where it names a local model
    folder or a hub model (an id, or a bare name as `resolve_model` maps it) already in the
    Hugging Face cache, looked up in the thread since importing huggingface_hub takes a
    moment; the thread, or None where there is nothing to read."""
    if not spec or not hasattr(os, "sendfile"):
        return None
    folder = embedded_cache_dir() if is_embedded(spec) else Path(spec).expanduser()
    if is_model_folder(folder):
        files = weight_files(folder)
        if not fits(files):
            return None
        target, args = read_into_cache, (files,)
    else:
        if is_embedded(spec) or looks_like_path(spec) or folder.suffix.lower() == ".gguf":
            return None  # the load converts the embedded GGUF, or says the path is not there
        hub_id = hub_id_of(spec)
        if hub_id is None:
            return None  # the load says what it tried
        target, args = read_cached_hub_model, (hub_id,)
    thread = threading.Thread(target=target, args=args, name="selftune-readahead", daemon=True)
    thread.start()
    return thread
