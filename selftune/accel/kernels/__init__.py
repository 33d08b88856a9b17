"""GPU fast paths, each with a plain-PyTorch version beside it that runs everywhere."""

from __future__ import annotations

import functools
from types import ModuleType


@functools.cache
def load_triton() -> ModuleType | None:
    """The module of compiled Triton kernels (kernels.triton_kernels), or None where Triton is
    not installed: imported on first use, so that a CPU-only install never needs Triton."""
    try:
        from selftune.accel.kernels import triton_kernels as module
    except ImportError:
        return None
    return module
