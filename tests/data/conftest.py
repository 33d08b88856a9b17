"""Small stand-ins for the built-in identity files, for tests of behaviour (not of the data)."""

import json

import pytest

ROWS = [
    {"lang": "zh", "topic": "who", "query": "你是谁?", "response": "我是{name},由{author}开发。"},
    {
        "lang": "zh",
        "topic": "maker",
        "query": "谁创造了你?",
        "response": "{author}创造了我,我叫{name}。",
    },
    {
        "lang": "en",
        "topic": "who",
        "query": "Who are you?",
        "response": "I am {name}, made by {author}.",
    },
    {
        "lang": "en",
        "topic": "name",
        "query": "What is your name?",
        "response": "My name is {name}.",
    },
]
PROMPTS = {
    "zh": ["你是一个乐于助人的助手。", "请简洁地回答。", "你是一名专业的顾问。"],
    "en": ["You are a helpful assistant.", "Answer briefly.", "You are an expert advisor."],
}


@pytest.fixture()
def identity_files(tmp_path, monkeypatch):
    """Point the identity module at small rows and prompt pools; returns (rows, prompts)."""
    import selftune.data.identity as identity

    rows_path, prompts_path = tmp_path / "identity.jsonl", tmp_path / "system_prompts.json"
    rows_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), "utf-8")
    prompts_path.write_text(json.dumps(PROMPTS, ensure_ascii=False), "utf-8")
    monkeypatch.setattr(identity, "IDENTITY_FILE", rows_path)
    monkeypatch.setattr(identity, "SYSTEM_PROMPTS_FILE", prompts_path)
    return rows_path, prompts_path
