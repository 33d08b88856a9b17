"""The identity takes on the embedded model with selftune's defaults (issues 4 and 5): held-out
questions in Chinese and English, under every system-prompt condition, on CPU. The runs behind
these tests are made in the background (conftest.py: identity_demo_job, tutorial_run_job)."""

import json

import pytest
from support import run_selftune

CONDITIONS = {"none", "model default", "held-out system prompts"}


@pytest.mark.slow
def test_held_out_identity_questions_name_the_identity(identity_checkpoint):
    """The eval that `selftune demo` ran on its checkpoint (eval.json), 12 questions a language."""
    report = json.loads((identity_checkpoint / "eval.json").read_text(encoding="utf-8"))
    assert set(report["identity"]) == CONDITIONS
    for condition, rates in report["identity"].items():
        for lang in ("zh", "en"):
            assert report["identity_counts"][condition][lang][1] == 12, condition
            assert rates[lang] >= 0.9, (condition, lang, report["identity_counts"][condition])
    # retention is measured and reported (README)
    assert report["base_correct"] > 0 and report["retention"] is not None
    # the built-in identity saves 0.7 of the trained update by default (--adapter_scale)
    config = json.loads((identity_checkpoint / "adapter_config.json").read_text())
    assert config["lora_alpha"] == pytest.approx(32 * 0.7)
    assert report["kl"] is not None and report["kl"] >= 0


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
def test_demo_tells_the_whole_story(identity_demo):
    stdout = identity_demo.stdout
    assert "before:" in stdout and "after:" in stdout
    assert "| identity hit rate |" in stdout
    lines = stdout.splitlines()
    at = lines.index("Q: Who are you?")
    before, after = lines[at + 1], lines[at + 2]
    assert before.lstrip().startswith("before:") and after.lstrip().startswith("after:")
    assert "Xinghe" not in before and "Xinghe" in after, (before, after)
    (eval_json,) = list(identity_demo.output.glob("v*/checkpoint-*/eval.json"))
    assert json.loads(eval_json.read_text())["identity"]


@pytest.mark.slow
def test_tutorial_rows_with_our_defaults_teach_the_embedded_model(tutorial_run):
    """The tutorial's 8 self-cognition rows, no flags but model and data (issue 4), cut short."""
    args = json.loads((tutorial_run.checkpoint / "args.json").read_text(encoding="utf-8"))
    # what the defaults chose for a model under 1B parameters (README, "Defaults"): 16-row
    # batches at lr 1e-3 for the 60 epochs that see 480 rows (the run stops at --max_steps 20)
    assert args["per_device_train_batch_size"] == 16 and args["learning_rate"] == 1e-3
    assert args["num_train_epochs"] == 60 and tutorial_run.checkpoint.name == "checkpoint-20"
    answer = tutorial_run.answer
    assert answer.returncode == 0, answer.stderr
    assert "CSDN 迪菲赫尔曼" in answer.stdout or "Swift-Robot" in answer.stdout, answer.stdout
