"""Reading a local model's weights into the page cache from the start of a run (readahead)."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

import pytest

from selftune.models import readahead
from selftune.models.readahead import read_into_cache, start_readahead, weight_files

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="mincore and /proc/meminfo")


def resident_share(path) -> float:
    """The share of the file's pages in the page cache (mincore over a private mapping, whose
    untouched pages are the page cache's)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        view = ctypes.c_char.from_buffer(mapped)
        failed = libc.mincore(ctypes.addressof(view), size, vec) != 0
        del view  # the mapping closes only without exported buffers
    if failed:
        pytest.skip(f"mincore failed: errno {ctypes.get_errno()}")
    return sum(v & 1 for v in vec) / pages


def evicted(path) -> bool:
    """Drop the file's clean pages from the page cache; False where the system kept them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return resident_share(path) < 0.5


def model_folder(tmp_path, shards: int = 2, size: int = 8 << 20):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    for i in range(shards):
        (folder / f"model-0000{i + 1}-of-0000{shards}.safetensors").write_bytes(os.urandom(size))
    return folder


def test_weight_files_are_the_shards_in_order_and_safetensors_first(tmp_path):
    folder = model_folder(tmp_path, shards=3, size=16)
    (folder / "pytorch_model.bin").write_bytes(b"x")
    names = [p.name for p in weight_files(folder)]
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    for p in folder.glob("*.safetensors"):
        p.unlink()
    assert [p.name for p in weight_files(folder)] == ["pytorch_model.bin"]
    (folder / "pytorch_model.bin").unlink()
    assert weight_files(folder) == []


@linux_only
def test_the_weights_are_in_the_page_cache_after_the_thread(tmp_path):
    folder = model_folder(tmp_path)
    files = weight_files(folder)
    if not all(evicted(p) for p in files):
        pytest.skip("this filesystem keeps the pages cached after POSIX_FADV_DONTNEED")
    thread = start_readahead(str(folder))
    assert thread is not None and thread.name == "selftune-readahead"
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert [round(resident_share(p), 2) for p in files] == [1.0] * len(files)


def test_only_model_folders_that_fit_in_memory_are_read(tmp_path, monkeypatch):
    folder = model_folder(tmp_path, shards=1, size=1 << 20)
    assert start_readahead(None) is None
    assert start_readahead("ms://Qwen/Qwen2.5-7B-Instruct") is None  # ModelScope: not looked up
    assert start_readahead("no-such-name") is None  # neither a folder nor a hub id
    assert start_readahead(str(tmp_path / "gone.gguf")) is None
    assert start_readahead(str(tmp_path)) is None  # no config.json
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert start_readahead(str(tmp_path / "empty")) is None  # no weight files
    monkeypatch.setattr(readahead, "available_memory", lambda: (2 << 20) - 2)  # over half
    assert start_readahead(str(folder)) is None
    monkeypatch.setattr(readahead, "available_memory", lambda: None)
    assert start_readahead(str(folder)) is None
    monkeypatch.setattr(readahead, "available_memory", lambda: 4 << 20)
    thread = start_readahead(str(folder))
    assert thread is not None
    thread.join(timeout=60)


@linux_only
def test_available_memory_is_read_from_the_system():
    available = readahead.available_memory()
    assert available is not None and 0 < available <= os.sysconf("SC_PHYS_PAGES") * mmap.PAGESIZE


def test_an_unreadable_file_ends_the_thread_quietly(tmp_path, caplog):
    caplog.set_level("DEBUG", logger="selftune.models.readahead")
    read_into_cache([tmp_path / "gone.safetensors"])  # the load reports it; the thread stops
    assert "readahead of" in caplog.text and "gone.safetensors" in caplog.text


def hub_snapshot(cache, hub_id: str, shards: int = 2):
    """A model in the Hugging Face cache's layout: blobs, a snapshot of links to them, and
    refs/main naming the snapshot."""
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    names = ["config.json"] + [
        f"model-0000{i + 1}-of-0000{shards}.safetensors" for i in range(shards)
    ]
    for i, name in enumerate(names):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes(b"{}" if name == "config.json" else os.urandom(4096))
        (snapshot / name).symlink_to(blob)
    return snapshot


@pytest.mark.parametrize("spec", ["Qwen/Qwen2.5-7B-Instruct", "Qwen2.5-7B-Instruct"])
def test_a_hub_model_in_the_cache_is_read(tmp_path, monkeypatch, spec):
    """A hub id, or a bare name with no local folder of that name, is read from its cached
    snapshot, as resolve_model would load it; one not in the cache reads nothing."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # no local folder named like the model
    read: list[list] = []
    monkeypatch.setattr(readahead, "read_into_cache", read.append)
    monkeypatch.setattr(readahead, "available_memory", lambda: 1 << 30)

    thread = start_readahead(spec)  # not cached yet: the load downloads it
    assert thread is not None
    thread.join(timeout=60)
    assert read == []

    snapshot = hub_snapshot(cache, "Qwen/Qwen2.5-7B-Instruct")
    thread = start_readahead(spec)
    thread.join(timeout=60)
    assert read == [weight_files(snapshot)] and len(read[0]) == 2

    monkeypatch.setattr(readahead, "available_memory", lambda: 8191)  # over half
    read.clear()
    start_readahead(spec).join(timeout=60)
    assert read == []
