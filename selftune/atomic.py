"""Atomic writes: a file or folder is built under a temporary name beside its final one and renamed
when complete, so a crash, a kill or a full disk never leaves half of one under the final name.
Temporary names are `.NAME.tmp-HOST-PID`, so leftovers of a killed process can be found and
removed (on a shared disk, only by a process of the host that made them)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# .NAME.tmp-HOST-PID (a temporary) or .NAME.old-HOST-PID (a replaced one, removed once the new
# one has its name); names without the host come from earlier versions
TEMP_NAME = re.compile(r"^\..+\.(?:tmp|old)-(?:(?P<host>.+)-)?(?P<pid>\d+)$")


def owner_tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{owner_tag()}")


def current_umask() -> int:
    """The process's umask, read without changing it where /proc tells it (os.umask can only
    read it by setting it, which another thread's file could catch)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_modes(folder: Path) -> None:
    """Files 0666 and folders 0777 less the umask (0644 / 0755 by default), as a plain write
    gives them: libraries that write through a private temporary file leave it 0600."""
    mask = current_umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


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
        publish_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not final.exists():
        tmp.rename(final)
    elif not replace:
        shutil.rmtree(tmp, ignore_errors=True)
    else:  # the old one leaves its name only once the new one is complete
        old = final.with_name(f".{final.name}.old-{owner_tag()}")
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


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporary files and folders in `folder` left by processes of this host that
    are gone (killed mid-write); return them."""
    host = socket.gethostname()
    removed = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = TEMP_NAME.match(path.name)
        if match is None or match["host"] not in (None, host):
            continue
        if process_alive(int(match["pid"])):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
