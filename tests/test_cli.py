import logging
import os
import subprocess
import sys

import pytest

from selftune.cli import quiet_libraries


@pytest.fixture
def liger_logger():
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("liger_kernel.backends.registry")
    parent = logging.getLogger("liger_kernel")
    level, hf_level = parent.level, hf_logging.get_verbosity()
    yield logger
    parent.setLevel(level)  # the rest of the session logs as before
    hf_logging.set_verbosity(hf_level)
    hf_logging.enable_progress_bar()


def test_library_warnings_only_under_debug(liger_logger):
    quiet_libraries(debug=False)
    assert not liger_logger.isEnabledFor(logging.WARNING)
    logging.getLogger("liger_kernel").setLevel(logging.NOTSET)
    quiet_libraries(debug=True)
    assert liger_logger.isEnabledFor(logging.WARNING)


CONSOLE = """
import atexit, ctypes, sys
import selftune.cli as cli

class Finalised:
    def __del__(self):
        print("torn down", flush=True)

kept = Finalised()

def main():
    atexit.register(print, "library handler ran", file=sys.stderr)  # as torch's, in the run
    print("work", end="")  # left in Python's buffer: the exit must write it
    if sys.argv[1] == "raise":
        raise RuntimeError("boom")
    ctypes.CDLL(None).printf(b"+C")  # left in C's stdio buffer (a pipe is fully buffered)
    return int(sys.argv[1])

cli.main = main
cli.console()
"""


def run_console(outcome: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.run(
        [sys.executable, "-c", CONSOLE, outcome],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.mark.parametrize("code", [0, 2])
def test_console_exits_with_mains_code_without_teardown(code):
    done = run_console(str(code))
    assert done.returncode == code
    # Python's buffer and C's written (in either order), and no teardown ("torn down")
    assert "+C" in done.stdout and done.stdout.replace("+C", "") == "work"
    assert done.stderr.strip() == "library handler ran"


def test_console_leaves_an_exception_to_pythons_own_exit():
    done = run_console("raise")
    assert done.returncode == 1
    assert "RuntimeError: boom" in done.stderr
    assert "library handler ran" in done.stderr and done.stdout == "worktorn down\n"
