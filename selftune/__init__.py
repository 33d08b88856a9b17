"""selftune: give an open chat model its own identity with LoRA, prove it took, serve it."""

from selftune.errors import SelftuneError

__version__ = "0.1.0"

__all__ = ["SelftuneError", "__version__"]
