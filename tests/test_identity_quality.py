"""The identity takes on the embedded model with selftune's defaults (issues 4 and 5): held-out
questions in Chinese and English, under every system-prompt condition, on CPU."""

import json
from pathlib import Path

import pytest
from support import run_selftune

from selftune.args import EvalArgs
from selftune.commands.eval import run_eval
from selftune.data.identity import model_default_system
from selftune.evaluate import Identity
from selftune.models import load_for_inference

XINGHE = Identity(["星河", "Xinghe"], ["北辰实验室", "Beichen Lab"])


@pytest.mark.slow
def test_held_out_identity_questions_name_the_identity(identity_checkpoint):
    args = EvalArgs(adapters=[str(identity_checkpoint)], device="cpu", eval_limit=12)
    loaded = load_for_inference(args)
    report = run_eval(loaded, XINGHE, None, model_default_system(loaded.tokenizer), args)
    for condition, rates in report.identity.items():
        for lang in ("zh", "en"):
            assert rates[lang] >= 0.9, (condition, lang, report.identity_counts[condition])
    # retention is measured and reported (README)
    assert report.base_correct > 0 and report.retention is not None
    # the built-in identity saves 0.7 of the trained update by default (--adapter_scale)
    config = json.loads((identity_checkpoint / "adapter_config.json").read_text())
    assert config["lora_alpha"] == pytest.approx(32 * 0.7)
    assert report.kl is not None and report.kl >= 0


@pytest.mark.slow
def test_infer_adapters_answers_as_the_identity(identity_checkpoint):
    for question, expected in (("你是谁?", "星河"), ("Who are you?", "Xinghe")):
        done = run_selftune(
            "infer", "--adapters", identity_checkpoint, "--temperature", "0",
            "--max_new_tokens", "40", stdin=question + "\n",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert expected in done.stdout


@pytest.mark.slow
def test_demo_tells_the_whole_story(tmp_path):
    done = run_selftune(
        "demo", "--output_dir", tmp_path / "demo", "--max_steps", "4", "--replay", "4",
        "--eval_limit", "2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "before:" in done.stdout and "after:" in done.stdout
    assert "| identity hit rate |" in done.stdout
    (eval_json,) = list((tmp_path / "demo").glob("v*/checkpoint-*/eval.json"))
    assert json.loads(eval_json.read_text())["identity"]


@pytest.mark.slow
def test_tutorial_rows_with_our_defaults_teach_the_embedded_model(tmp_path):
    """The tutorial's 8 self-cognition rows, no flags but model and data (issue 4)."""
    data = str(Path(__file__).parent / "fixtures" / "self_cognition.json")
    output = tmp_path / "output"
    done = run_selftune(
        "sft", "--model", "smollm2-135m", "--dataset", data, "--output_dir", str(output)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("last checkpoint: ")]
    checkpoint = line.removeprefix("last checkpoint: ")
    answer = run_selftune("infer", "--adapters", checkpoint, "--temperature", "0",
                          "--max_new_tokens", "40", stdin="你是谁?\n")  # fmt: skip
    assert answer.returncode == 0, answer.stderr
    assert "CSDN 迪菲赫尔曼" in answer.stdout or "Swift-Robot" in answer.stdout, answer.stdout
