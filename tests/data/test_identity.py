"""The built-in identity set: values, filling, system-prompt variants, the default system prompt."""

import json
import re

import pytest

from selftune.data.encode import encode
from selftune.data.identity import (
    NO_SYSTEM,
    IdentityValues,
    identity_conversations,
    load_identity_rows,
    load_system_prompts,
    model_default_system,
    parse_identity_values,
    write_identity_file,
)
from selftune.errors import SelftuneError

VALUES = IdentityValues("星河", "Xinghe", "北辰实验室", "Beichen Lab")
CJK = re.compile(r"[\u4e00-\u9fff]")
SMOL_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
NO_DEFAULT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_one_value_serves_both_languages_two_are_zh_then_en():
    assert parse_identity_values(["Robo"], ["ACME"]) == IdentityValues(
        "Robo", "Robo", "ACME", "ACME"
    )
    assert parse_identity_values(["星河", "Xinghe"], ["北辰实验室", "Beichen Lab"]) == VALUES


@pytest.mark.parametrize(
    ("names", "authors", "pattern"),
    [
        ([], ["ACME"], "--model_name"),
        (["Robo"], [], "--model_author"),
        (["  "], ["ACME"], "--model_name"),
        (["a", "b", "c"], ["ACME"], "--model_name takes one value .* got 3"),
    ],
)
def test_bad_identity_values_are_errors(names, authors, pattern):
    with pytest.raises(SelftuneError, match=pattern):
        parse_identity_values(names, authors)


def test_each_language_gets_its_own_values(identity_files):
    conversations = identity_conversations(VALUES, None, None, variants=False, seed=0)
    assert len(conversations) == 4
    for conversation in conversations:
        assert [m["role"] for m in conversation] == ["user", "assistant"]
        answer = conversation[1]["content"]
        if CJK.search(conversation[0]["content"]):
            assert "星河" in answer or "北辰实验室" in answer
            assert "Xinghe" not in answer and "Beichen" not in answer
        else:
            assert "Xinghe" in answer and "星河" not in answer
        assert "{" not in answer


def test_unknown_placeholder_in_the_data_is_an_error(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"lang": "en", "query": "Who?", "response": "I am {nmae}."}) + "\n")
    with pytest.raises(SelftuneError, match=r"rows.jsonl line 1: unknown placeholder"):
        load_identity_rows(path)


def systems_of(conversations):
    return [c[0]["content"] if c[0]["role"] == "system" else None for c in conversations]


def test_variants_on_off_change_the_system_prompts_seen(identity_files):
    _, prompts_path = identity_files
    pool = load_system_prompts(prompts_path)
    off = identity_conversations(VALUES, "SYS", "DEF", variants=False, seed=0)
    on = identity_conversations(VALUES, "SYS", "DEF", variants=True, seed=0)
    assert set(systems_of(off)) == {None}  # encode then applies --system (or the template's)
    assert len(on) == 3 * len(off)  # --system, the default, one drawn prompt per pair
    seen = systems_of(on)
    assert seen.count("SYS") == seen.count("DEF") == len(off)
    drawn = [s for s in seen if s not in ("SYS", "DEF")]
    assert len(drawn) == len(off) and set(drawn) <= set(pool["zh"] + pool["en"])
    pairs = {json.dumps(c[1:]) for c in on}
    assert pairs == {json.dumps(c) for c in off}  # the same Q/A under every condition


def test_no_default_and_no_system_gives_an_explicit_empty_system(identity_files):
    on = identity_conversations(VALUES, None, None, variants=True, seed=0)
    assert systems_of(on).count(NO_SYSTEM) == 4 and len(on) == 8


def test_drawn_prompts_are_seeded_and_sometimes_from_the_other_language(tmp_path, identity_files):
    _, prompts_path = identity_files
    rows = tmp_path / "many.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"lang": "zh", "query": f"你是谁{i}?", "response": "我是{name}。"}) + "\n"
            for i in range(400)
        )
    )

    def drawn(seed):
        on = identity_conversations(VALUES, None, None, True, seed, rows_path=rows)
        return [s for s in systems_of(on) if s != NO_SYSTEM]

    first = drawn(1)
    assert first == drawn(1) and first != drawn(2)
    english = sum(not CJK.search(s) for s in first)
    assert 0.15 * 400 < english < 0.35 * 400  # OTHER_LANGUAGE_SHARE is 0.25


def test_model_default_system_of_smollm(smol_tokenizer):
    assert model_default_system(smol_tokenizer) == SMOL_DEFAULT


def test_model_default_system_none_without_one(smol_tokenizer, monkeypatch):
    monkeypatch.setattr(smol_tokenizer, "chat_template", NO_DEFAULT_TEMPLATE)
    assert model_default_system(smol_tokenizer) is None
    refusing = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}x"
    )
    monkeypatch.setattr(smol_tokenizer, "chat_template", refusing)
    assert model_default_system(smol_tokenizer) is None


def test_no_system_variant_renders_without_system_prompt(smol_tokenizer, monkeypatch):
    conversation = [{"role": "system", "content": NO_SYSTEM}, {"role": "user", "content": "q"}]
    conversation.append({"role": "assistant", "content": "a"})
    monkeypatch.setattr(smol_tokenizer, "chat_template", NO_DEFAULT_TEMPLATE)
    text = smol_tokenizer.decode(encode(smol_tokenizer, conversation, 100, "SYS").input_ids)
    assert text.startswith("<|im_start|>user\nq") and "SYS" not in text


# The shipped data (written for this project): counts, coverage, every placeholder fillable.


def test_shipped_identity_data_counts_and_fills():
    rows = load_identity_rows()
    for lang in ("zh", "en"):
        assert sum(r["lang"] == lang for r in rows) >= 150
    conversations = identity_conversations(VALUES, None, None, variants=False, seed=0)
    text = json.dumps(conversations, ensure_ascii=False)
    assert "{name}" not in text and "{author}" not in text
    assert not re.search(r"\{\w+\}", text)
    pools = load_system_prompts()
    assert len(pools["zh"]) >= 5 and len(pools["en"]) >= 5


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_write_identity_file(tmp_path, identity_files, suffix):
    output = tmp_path / "out" / f"identity{suffix}"
    counts = write_identity_file(VALUES, output)
    assert counts == {"zh": 2, "en": 2}
    text = output.read_text("utf-8")
    records = json.loads(text) if suffix == ".json" else [json.loads(x) for x in text.splitlines()]
    assert [r["lang"] for r in records] == ["zh", "zh", "en", "en"]
    assert records[2]["messages"][1]["content"] == "I am Xinghe, made by Beichen Lab."
    assert [p.name for p in output.parent.iterdir()] == [output.name]  # no temporary left

    from selftune.data.formats import load_file

    assert len(load_file(output)) == 4  # the written file is itself a valid dataset
