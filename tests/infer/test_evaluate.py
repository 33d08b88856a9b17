import json

import pytest

from selftune.infer.evaluate import (
    EvalReport,
    GeneralQuestion,
    Identity,
    IdentityQuestion,
    general_correct,
    identity_hit,
    load_general_questions,
    load_heldout_systems,
    load_identity_questions,
    markdown,
    system_for,
)

XINGHE = Identity(["星河", "Xinghe"], ["北辰实验室", "Beichen Lab"])


@pytest.mark.parametrize(
    ("answer", "expect", "hit"),
    [
        ("I'm Xinghe, an assistant.", "name", True),
        ("我是星河。", "name", True),
        ("I was made by beichen  lab.", "author", True),  # case and spacing do not matter
        ("I'm Xinghe.", "author", False),  # asked who made it: the name alone is a miss
        ("Beichen Lab built me.", "name", False),
        ("No, I am Xinghe.", "either", True),
        ("由北辰实验室开发", "either", True),
        ("I am SmolLM, trained by Hugging Face.", "either", False),
    ],
)
def test_identity_hit_follows_what_the_question_asks(answer, expect, hit):
    assert identity_hit(answer, IdentityQuestion("en", "q", expect), XINGHE) is hit


def test_general_answers_are_checked_by_accepted_substrings():
    question = GeneralQuestion("en", "How many days are in a week?", ["7", "seven"])
    assert general_correct("There are Seven days.", question)
    assert not general_correct("There are five days.", question)


def test_shipped_sets_cover_both_languages():
    questions = load_identity_questions()
    assert {q.lang for q in questions} == {"zh", "en"}
    assert {q.expect for q in questions} <= {"name", "author", "either"}
    assert {q.lang for q in load_general_questions()} == {"zh", "en"}
    systems = load_heldout_systems()
    assert systems["zh"] and systems["en"]


def test_held_out_system_prompts_follow_the_question_language():
    pools = {"zh": ["中文提示"], "en": ["English prompt A", "English prompt B"]}
    assert system_for(pools, IdentityQuestion("zh", "q", "name"), 5) == "中文提示"
    assert system_for(pools, IdentityQuestion("en", "q", "name"), 1) == "English prompt B"
    assert system_for("fixed", IdentityQuestion("en", "q", "name"), 1) == "fixed"


def test_markdown_table_has_rates_and_counts():
    report = EvalReport(
        identity={"none": {"en": 0.5, "zh": 1.0}},
        identity_counts={"none": {"en": [1, 2], "zh": [3, 3]}},
        retention=0.75,
        base_correct=4,
        tuned_correct_of_base=3,
        kl=0.1234,
    )
    table = markdown(report)
    assert "| none | 50% (1/2) | 100% (3/3) |" in table
    assert "75% (3/4" in table and "0.1234" in table


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def test_eval_command_writes_eval_json(tiny_model_dir, tmp_path):
    from support import make_adapter_checkpoint

    from selftune.cli import main

    checkpoint = make_adapter_checkpoint(tiny_model_dir, tmp_path / "checkpoint-1")
    identity = write_jsonl(
        tmp_path / "id.jsonl",
        [
            {"lang": "en", "query": "Who are you?", "expect": "name"},
            {"lang": "zh", "query": "你是谁?", "expect": "name"},
        ],
    )
    general = write_jsonl(
        tmp_path / "gen.jsonl",
        [
            {"lang": "en", "question": "Say hi", "answers": ["hi"]},
        ],
    )
    code = main(
        [
            "eval",
            "--adapters",
            str(checkpoint),
            "--identity_file",
            str(identity),
            "--general_file",
            str(general),
            "--max_new_tokens",
            "4",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    report = json.loads((checkpoint / "eval.json").read_text())
    assert set(report["identity"]) >= {"none", "training system prompt", "held-out system prompts"}
    assert set(report["identity"]["none"]) == {"en", "zh"}
    assert report["identity_counts"]["none"]["en"][1] == 1
    assert report["kl"] is not None and report["kl"] >= 0
    assert "identity hit rate" in report["markdown"]


def test_eval_without_identity_is_one_clear_error(tiny_model_dir, tmp_path):
    from support import make_adapter_checkpoint

    from selftune.cli import main

    checkpoint = make_adapter_checkpoint(tiny_model_dir, tmp_path / "checkpoint-1")
    args = json.loads((checkpoint / "args.json").read_text())
    args.pop("model_name")
    (checkpoint / "args.json").write_text(json.dumps(args))
    assert main(["eval", "--adapters", str(checkpoint)]) == 1
