"""`selftune VERB [flags]`: maps each verb to its options dataclass and its function."""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from selftune.errors import SelftuneError

# verb -> (module with `ARGS` and `run(args)`, one-line help). Only verbs that work are listed.
VERBS: dict[str, tuple[str, str]] = {
    "demo": ("selftune.commands.demo", "the whole story on the embedded model, with numbers"),
    "infer": ("selftune.commands.infer", "chat in the terminal, or answer a dataset into JSONL"),
    "sft": ("selftune.commands.sft", "fine-tune: LoRA, DoRA, full, 4-bit QLoRA"),
    "eval": ("selftune.commands.eval", "identity hit rate and retention of an adapter vs its base"),
    "identity": ("selftune.commands.identity", "write the built-in identity dataset, filled in"),
    "serve": ("selftune.commands.serve", "OpenAI-compatible API and web chat page"),
    "export": ("selftune.commands.export", "merged model, adapter, GGUF + Ollama Modelfile"),
    "kb": ("selftune.commands.kb", "knowledge bases: kb add|ls|rm|search NAME ..."),
}


# libraries that log through the root logger, and so print as our own lines (Liger warns of
# every hardware backend it cannot import)
CHATTY_LOGGERS = ("liger_kernel",)


def usage() -> str:
    lines = ["usage: selftune VERB [flags]  (or selftune VERB config.yaml [flags])", "", "verbs:"]
    lines += [f"  {verb:<10} {text}" for verb, (_, text) in VERBS.items()]
    lines += ["", "`selftune VERB --help` lists a verb's flags."]
    return "\n".join(lines)


def quiet_libraries(debug: bool) -> None:
    """Our own log lines say what is happening; library chatter only under --debug."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="[selftune] %(message)s",
        stream=sys.stderr,
    )
    if not debug:
        import warnings

        warnings.filterwarnings("ignore")
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:
            pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from selftune import __version__

        print(f"selftune {__version__}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"selftune: unknown verb '{verb}'\n\n{usage()}", file=sys.stderr)
        return 2
    if verb == "sft":
        from selftune.train.distributed import torchrun_command

        if command := torchrun_command(argv):
            import subprocess

            return subprocess.call(command)
    debug = "--debug" in rest and rest[rest.index("--debug") + 1 :][:1] != ["false"]
    quiet_libraries(debug)
    try:
        module = importlib.import_module(VERBS[verb][0])
        from selftune.args import parse_args

        parse = getattr(module, "parse", None)  # verbs with sub-verbs parse their own
        prog = f"selftune {verb}"
        args = parse(rest, prog) if parse else parse_args(module.ARGS, rest, prog=prog)
        run: Callable[[Any], int | None] = module.run
        return int(run(args) or 0)
    except SelftuneError as exc:
        if debug:
            raise
        print(f"selftune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\nselftune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure: one line, the trace with --debug
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"selftune: error: {type(exc).__name__}: {first} (rerun with --debug for the trace)",
            file=sys.stderr,
        )
        return 1


def console() -> NoReturn:
    """The `selftune` command: `main`, then, once it has returned, an exit that skips tearing the
    interpreter down (thousands of modules, the model, the CUDA context: a noticeable part of a
    small run's wall time). Other threads are joined and the atexit handlers registered during
    the run (torch's, the libraries') run first, as in any exit."""
    returned: list[int] = []
    atexit.register(exit_now, returned)  # registered before the libraries' handlers: runs after
    returned.append(main())
    raise SystemExit(returned[0])


def exit_now(returned: list[int]) -> None:
    """End the process with `main`'s code, buffered output written (C's stdio buffers are written
    by Python's handling of the SystemExit, before atexit); where `main` raised, Python's own
    exit goes on (its trace, its code)."""
    if not returned:
        return
    logging.shutdown()  # its atexit handler was registered before ours, so would not run
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # no stream, a closed pipe
            pass
    os._exit(returned[0])


if __name__ == "__main__":
    console()
