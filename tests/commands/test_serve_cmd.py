"""`selftune serve` flag checks, made before any weights load (the running server is tested in
tests/serve/, where the fixture starts it with this command)."""

import subprocess
import sys

import pytest

from selftune.commands.serve import adapter_checkpoints, base_model_name
from selftune.errors import UsageError


def adapter_folder(path, kind="adapter_config.json"):
    path.mkdir(parents=True)
    (path / kind).write_text("{}", encoding="utf-8")
    return path


def test_adapters_are_named_by_flag_or_by_folder(tmp_path):
    first = adapter_folder(tmp_path / "run" / "checkpoint-30")
    second = adapter_folder(tmp_path / "odd=name" / "checkpoint-5")
    found = adapter_checkpoints([f"xinghe={first}", str(second)])
    assert found == {"xinghe": first, "checkpoint-5": second}


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: [f"a={tmp / 'missing'}"], "not a LoRA checkpoint"),
        (lambda tmp: [f"a={adapter_folder(tmp / 'full', 'config.json')}"], "full checkpoint"),
        (lambda tmp: [f"a={adapter_folder(tmp / 'x')}", f"a={adapter_folder(tmp / 'y')}"], "twice"),
    ],
    ids=["missing", "full checkpoint", "same name twice"],
)
def test_bad_adapters_are_usage_errors(tmp_path, make, message):
    with pytest.raises(UsageError, match=message):
        adapter_checkpoints(make(tmp_path))


def test_base_model_name_is_the_spec_or_a_folder_name(tmp_path):
    assert base_model_name("smollm2-135m") == "smollm2-135m"
    assert base_model_name("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    (tmp_path / "My-Model").mkdir()
    assert base_model_name(str(tmp_path / "My-Model")) == "My-Model"


def test_bad_adapter_fails_in_one_line_before_loading(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "selftune", "serve", "--model", "smollm2-135m"]
        + ["--adapters", f"x={tmp_path}", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no adapter_config.json" in lines[0], done.stderr
