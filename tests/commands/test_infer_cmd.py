"""`selftune infer` as a user runs it: a real process, piped stdin, real model files."""

import json

import pytest
from support import run_selftune as selftune


@pytest.mark.slow
def test_piped_chat_with_embedded_model():
    done = selftune(
        "infer",
        "--model",
        "smollm2-135m",
        "--temperature",
        "0",
        "--max_new_tokens",
        "40",
        stdin="What is the capital of France?\n",
    )
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


def test_missing_model_is_one_line_no_trace(tmp_path):
    done = selftune("infer", "--model", "/no/such/model")
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "/no/such/model" in lines[0]
    assert "Traceback" not in done.stderr


def test_unknown_flag_is_usage_error():
    done = selftune("infer", "--model", "x", "--no_such_flag", "1")
    assert done.returncode == 2
    assert "no_such_flag" in done.stderr


def test_batch_mode_from_config_file(tiny_model_dir, tmp_path):
    data = tmp_path / "val.jsonl"
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Hi"}]})
        + "\n"
        + json.dumps({"instruction": "Say yes", "input": "", "output": "yes"})
        + "\n",
        encoding="utf-8",
    )
    config = tmp_path / "infer.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\nval_dataset: [{data}]\nmax_new_tokens: 5\nstream: false\n"
    )
    result = tmp_path / "res.jsonl"
    done = selftune("infer", str(config), "--result_path", str(result))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in result.read_text().splitlines()]
    assert [r["query"] for r in rows] == ["Hi", "Say yes"]
    assert rows[1]["labels"] == "yes"


def test_help_lists_working_verbs():
    done = selftune("--help")
    assert done.returncode == 0
    assert "infer" in done.stdout and "identity" in done.stdout


def test_checkpoints_with_non_finite_weights_are_refused_in_one_line(tmp_path, tiny_model_dir):
    """infer, eval, serve and export each refuse a checkpoint whose weights hold a NaN, before
    any model loads."""
    from safetensors.torch import load_file, save_file
    from support import make_adapter_checkpoint

    checkpoint = make_adapter_checkpoint(tiny_model_dir, tmp_path / "run" / "checkpoint-4")
    path = checkpoint / "adapter_model.safetensors"
    weights = load_file(path)
    name = sorted(weights)[0]
    weights[name][0, 0] = float("nan")
    save_file(weights, path)
    commands = {
        "infer": ["infer", "--adapters", checkpoint],
        "eval": ["eval", "--adapters", checkpoint],
        "serve": ["serve", "--model", tiny_model_dir, "--adapters", f"x={checkpoint}", "--port", 0],
        "export": ["export", "--adapters", checkpoint],
    }
    for verb, argv in commands.items():
        done = selftune(*argv, stdin="hi\n", timeout=300)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1, (verb, done.stderr)
        assert "its weights are not finite" in lines[0] and name in lines[0], verb
    assert not (tmp_path / "run" / "checkpoint-4-merged").exists()


def test_answers_from_a_knowledge_base_carry_their_sources(tiny_model_dir, tmp_path):
    """`infer --kb`: each batch answer's row names the passages it was given, and chat lists
    them after each answer; the question keeps its own text in the row."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "kitchen.md").write_text(
        "# Orbital Kitchen\n\n## Menu\n\nThe Comet Stew costs 14 credits.\n", "utf-8"
    )
    (docs / "harbor.md").write_text("# 星河港\n\n## 灯塔\n\n最老的灯塔叫白石塔。\n", "utf-8")
    env = {"SELFTUNE_HOME": str(tmp_path / "home")}
    added = selftune("kb", "add", "docs", docs, env=env)
    assert added.returncode == 0, added.stderr
    data = tmp_path / "q.jsonl"
    rows = [{"query": "How much is the Comet Stew?", "response": "14 credits"},
            {"query": "最老的灯塔叫什么?", "response": "白石塔"}]  # fmt: skip
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    result = tmp_path / "res.jsonl"
    done = selftune(
        "infer", "--model", tiny_model_dir, "--kb", "docs", "--kb_threshold", "0",
        "--val_dataset", data, "--result_path", result, "--max_new_tokens", "4", env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answered = [json.loads(line) for line in result.read_text().splitlines()]
    assert [r["query"] for r in answered] == [r["query"] for r in rows]
    assert answered[0]["sources"][0]["path"].endswith("kitchen.md")
    assert answered[1]["sources"][0]["path"].endswith("harbor.md")
    assert "[1] 星河港 > 灯塔\n最老的灯塔叫白石塔。" in answered[1]["messages"][-1]["content"]
    chat = selftune(
        "infer", "--model", tiny_model_dir, "--kb", "docs", "--kb_threshold", "0",
        "--max_new_tokens", "4", env=env, stdin="How much is the Comet Stew?\n",
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    assert "kitchen.md: Orbital Kitchen > Menu" in chat.stdout
