"""Atomic writes: all or nothing under the final name, with the modes of a plain write."""

import os
import stat

import pytest

from selftune.atomic import atomic_folder, remove_stale_temps, write_json_atomic


def test_a_folder_appears_whole_or_not_at_all(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_folder(final) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("killed mid-way")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(final) as tmp:
        (tmp / "whole").write_text("x")
    assert [p.name for p in final.iterdir()] == ["whole"]


def test_replace_or_keep_an_existing_folder(tmp_path):
    final = tmp_path / "out"
    for name in ("first", "second"):
        with atomic_folder(final) as tmp:
            (tmp / name).write_text(name)
    assert [p.name for p in final.iterdir()] == ["second"]
    with atomic_folder(final, replace=False) as tmp:
        (tmp / "third").write_text("x")
    assert [p.name for p in final.iterdir()] == ["second"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_private_files_get_the_modes_of_a_plain_write(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_folder(tmp_path / "out") as tmp:
            private = tmp / "weights"
            private.write_text("x")
            private.chmod(0o600)
            (tmp / "sub").mkdir(mode=0o700)
            write_json_atomic(tmp / "sub" / "config.json", {})
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").rglob("*")}
    assert modes == {"weights": 0o644, "sub": 0o755, "config.json": 0o644}


def test_stale_temps_of_dead_processes_go_and_live_ones_stay(tmp_path):
    import socket

    host = socket.gethostname()
    dead = [
        tmp_path / f".checkpoint-4.tmp-{host}-999999999",
        tmp_path / ".checkpoint-4.tmp-999999998",  # an earlier version's name: this host's
        tmp_path / f".checkpoint-2.old-{host}-999999997",
        tmp_path / f".args.json.tmp-{host}-999999996",
    ]
    kept = [
        tmp_path / f".checkpoint-4.tmp-{host}-{os.getpid()}",  # alive
        tmp_path / ".checkpoint-4.tmp-another-host-999999999",  # not ours to judge
        tmp_path / "checkpoint-4",
    ]
    for path in dead[:3] + kept:
        path.mkdir()
    dead[3].write_text("{")
    assert remove_stale_temps(tmp_path) == sorted(dead)
    assert sorted(tmp_path.iterdir()) == sorted(kept)
