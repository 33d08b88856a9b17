"""Atomic writes: a file or folder is built under a temporary name beside its final one and renamed
when complete, so a crash, a kill or a full disk never leaves half of one under the final name.
Temporary names are `.NAME.tmp-PID`, so leftovers of a killed process can be found and removed."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_folder(final: Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder that takes `final`'s name when the block ends without an
    error, and is removed when it raises. An existing `final` is replaced, or with
    `replace=False` kept (another process made it first) and the new one dropped."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not final.exists():
        tmp.rename(final)
    elif not replace:
        shutil.rmtree(tmp, ignore_errors=True)
    else:  # the old one leaves its name only once the new one is complete
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, ensure_ascii=False, indent=2))


def write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(final: Path) -> list[Path]:
    """Remove the temporary folders of `final` left by processes that are gone; return them."""
    removed = []
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    return removed
