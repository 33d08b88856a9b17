"""Runs of `selftune` that take minutes, made while the other tests run. The first starts with
the session, at idle CPU priority: the other tests spend much of their time starting processes
and waiting on servers, which leaves a core idle, and the run takes it without slowing them. The
others start beside it when a test first has to wait for a run, and a run that a test waits for
gets normal priority back. Each run gets half the cores, so two of them fill the machine;
conftest.py orders the tests that wait on a run last."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

# job(selftune, folder) -> result: `selftune(*args, stdin="")` runs `python -m selftune ARGS`
# and returns the finished process; `folder` is the job's own
Job = Callable[[Callable[..., subprocess.CompletedProcess], Path], Any]

# Lowers its own scheduling class, then becomes the command (preexec_fn is unsafe with threads).
IDLE_EXEC = """import os, sys
try:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
except (AttributeError, OSError):
    os.nice(19)
os.execv(sys.argv[1], sys.argv[1:])
"""


def half_the_cores() -> int:
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count())
    return max(1, len(usable) // 2)


def normal_priority(pid: int) -> None:
    """Every thread of the process back to the normal class, where the system allows it."""
    tasks = Path(f"/proc/{pid}/task")
    for tid in [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [pid]:
        try:
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, tid, 0)
        except (AttributeError, OSError):
            pass  # not permitted here, or the thread ended: the run goes on at idle priority


class Background:
    def __init__(self, jobs: dict[str, Job], folder: Path) -> None:
        self.jobs = jobs
        self.folder = folder
        self.wanted: list[str] = []
        self.started: set[str] = set()
        self.waited_for: set[str] = set()
        self.running: dict[str, subprocess.Popen] = {}
        self.results: dict[str, Any] = {}
        self.errors: dict[str, BaseException] = {}
        self.finished = {name: threading.Event() for name in jobs}
        self.lock = threading.Lock()
        self.stopped = False

    def want(self, names: list[str]) -> None:
        """The jobs this session needs, in the order its tests need them; the first starts now."""
        self.wanted = list(names)
        if self.wanted:
            self.start(self.wanted[0])

    def start(self, name: str) -> None:
        with self.lock:
            if name in self.started:
                return
            self.started.add(name)
        threading.Thread(target=self.run_job, args=(name,), daemon=True).start()

    def run_job(self, name: str) -> None:
        def selftune(*args: Any, stdin: str = "", timeout: int = 3600):
            return self.selftune(name, args, stdin, timeout)

        try:
            self.results[name] = self.jobs[name](selftune, self.folder / name)
        except BaseException as exc:  # raised again in the test that waits for it
            self.errors[name] = exc
        self.finished[name].set()

    def selftune(self, name: str, args: tuple, stdin: str, timeout: int):
        """`python -m selftune ARGS` on half the cores, at idle priority unless waited for."""
        command = [sys.executable, "-m", "selftune", *map(str, args)]
        env = {**os.environ, "OMP_NUM_THREADS": str(half_the_cores())}
        pipe = subprocess.PIPE
        with self.lock:
            if self.stopped:
                raise RuntimeError("the test session is over")
            idle = [] if name in self.waited_for else [sys.executable, "-c", IDLE_EXEC]
            process = subprocess.Popen(
                [*idle, *command], stdin=pipe, stdout=pipe, stderr=pipe, text=True, env=env
            )
            self.running[name] = process
        with process:
            try:
                out, err = process.communicate(stdin, timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                raise
        return subprocess.CompletedProcess(command, process.returncode, out, err)

    def result(self, name: str, timeout: float = 3600) -> Any:
        """The job's result once it is done. While a test waits, the other jobs run beside it."""
        if not self.finished[name].is_set():
            for each in (name, *self.wanted):
                self.start(each)
            with self.lock:
                self.waited_for.add(name)
                process = self.running.get(name)
                if process is not None and process.poll() is None:
                    normal_priority(process.pid)
        if not self.finished[name].wait(timeout):
            raise TimeoutError(f"the background run {name} took over {timeout} s")
        if name in self.errors:
            raise self.errors[name]
        return self.results[name]

    def stop(self) -> None:
        """End the runs still going (a session that ends early)."""
        with self.lock:
            self.stopped = True
            for process in self.running.values():
                if process.poll() is None:
                    process.kill()
