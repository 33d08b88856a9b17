"""The imports of the steps after a model load, run in a thread while its weights are read.

Reading 15 GB of weights keeps the disk busy and the CPU idle for seconds; LoRA (peft), Liger,
the checkpoint code and the loss plot import in that time instead of after it. The model's own
code is imported first, on the caller's thread: after it, `from_pretrained` imports nothing
more while the weights are read, so the two threads do not import side by side. The caller
joins the thread before it imports anything else.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)


def import_model_code(folder: Path) -> bool:
    """Import the modeling code of the causal LM in `folder`; False where it cannot be found
    this way (then nothing is imported in a thread)."""
    try:
        from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

        MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(folder))]
    except Exception as exc:  # the load itself reports what is wrong with the folder
        log.debug("no imports during the load: %s", exc)
        return False
    return True


def import_in_thread(names: Sequence[str | Callable[[], object]]) -> threading.Thread:
    """Start importing `names`, in order, or calling those that are functions (the Triton
    kernels' compiles: accel.kernels.precompile); one that fails is left to run where it is used."""

    def run() -> None:
        for name in names:
            try:
                name() if callable(name) else importlib.import_module(name)
            except Exception as exc:
                log.debug("%s during the load failed: %s", name, exc)

    thread = threading.Thread(target=run, name="selftune-imports", daemon=True)
    thread.start()
    return thread
