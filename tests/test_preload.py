import sys

import pytest

from selftune.models import load_model
from selftune.preload import import_in_thread, import_model_code


@pytest.fixture
def late_modules(tmp_path, monkeypatch):
    """Modules no test has imported: one that fails, one slow to import (it sets `done` last)."""
    (tmp_path / "preload_broken.py").write_text("raise RuntimeError('broken on import')\n")
    (tmp_path / "preload_slow.py").write_text("import time\ntime.sleep(0.3)\ndone = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield ["preload_broken", "preload_slow"]
    for name in ("preload_broken", "preload_slow"):
        sys.modules.pop(name, None)


def test_a_failed_import_leaves_the_rest_to_import(late_modules):
    import_in_thread(late_modules).join()
    assert "preload_broken" not in sys.modules
    assert sys.modules["preload_slow"].done


def test_load_returns_once_the_imports_are_done(tiny_model_dir, late_modules):
    model, _, _ = load_model(str(tiny_model_dir), device="cpu", meanwhile=late_modules)
    assert sys.modules["preload_slow"].done  # fully imported, not half way
    assert model.config.model_type == "llama"


def test_model_code_is_imported_before_the_thread_starts(tmp_path):
    folder = tmp_path / "phi3"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "phi3"}')
    assert import_model_code(folder)
    assert "transformers.models.phi3.modeling_phi3" in sys.modules
    assert not import_model_code(tmp_path)  # no config.json: no thread, the load says why
