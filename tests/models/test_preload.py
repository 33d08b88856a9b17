import sys

import pytest

from selftune.models.load import load_model
from selftune.models.preload import import_in_thread, import_model_code


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


def test_model_code_imports_the_familys_modeling_module(tmp_path):
    name = "transformers.models.phi3.modeling_phi3"
    if name in sys.modules:
        pytest.skip("phi3's code was imported earlier in this session")
    folder = tmp_path / "phi3"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "phi3"}')
    assert import_model_code(folder)
    assert name in sys.modules
    assert not import_model_code(tmp_path)  # no config.json: no thread, the load says why


def test_the_thread_starts_after_the_model_code_and_ends_before_the_load_returns(
    tiny_model_dir, monkeypatch
):
    import selftune.models.preload as preload

    order = []
    real_code, real_thread = preload.import_model_code, preload.import_in_thread

    def model_code(folder):
        order.append("model code")
        return real_code(folder)

    def thread(names):
        order.append(f"thread: {', '.join(names)}")
        started = real_thread(names)
        real_join = started.join
        started.join = lambda: (order.append("joined"), real_join())
        return started

    monkeypatch.setattr(preload, "import_model_code", model_code)
    monkeypatch.setattr(preload, "import_in_thread", thread)
    load_model(str(tiny_model_dir), device="cpu", meanwhile=["json"])
    assert order == ["model code", "thread: json", "joined"]
    order.clear()
    load_model(str(tiny_model_dir), device="cpu")  # nothing asked for: no thread
    assert order == []


@pytest.mark.parametrize(
    ("train_type", "device", "cuda", "peft", "liger"),
    [
        ("lora", None, True, True, True),
        ("lora", "cpu", True, True, False),
        ("qlora", None, False, True, False),
        ("full", "cuda", True, False, True),
        ("dora", None, True, True, True),
    ],
)
def test_later_imports_are_what_the_run_uses(
    monkeypatch, tmp_path, train_type, device, cuda, peft, liger
):
    import torch

    from selftune.args import SftArgs
    from selftune.train.recipe import later_imports

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    names = later_imports(SftArgs(train_type=train_type, device=device), tmp_path)
    assert ("peft" in names) == peft
    assert ("liger_kernel.transformers.monkey_patch" in names) == liger
    assert "matplotlib.figure" in names
    compiles = tuple(n for n in names if callable(n))  # last: after every import
    assert compiles == names[len(names) - len(compiles) :]
    # on a GPU (where Liger comes), unless the head trains: the dropout kernels for LoRA alone
    assert len(compiles) == int(liger and train_type != "full")
    if compiles:
        rank = 8 if train_type == "lora" else 0
        assert compiles[0].args == (tmp_path, rank, torch.bfloat16, "cuda")
