import io
import json

import pytest

from selftune.infer import chat
from selftune.infer.generate import Completion, generate
from selftune.infer.sampling import SamplingParams


class Recorder:
    """Stands in for the generation engine to see what each turn sends."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, tokenizer, conversations, params, on_text=None, **kwargs):
        self.calls.append(conversations[0])
        text = f"answer{len(self.calls)}"
        if on_text:
            on_text(0, text)
        return [Completion(text, 1, 1, "stop")]


def run_chat(monkeypatch, typed: str, system=None):
    recorder = Recorder()
    monkeypatch.setattr(chat, "generate", recorder)
    out = io.StringIO()
    chat.chat_loop(None, None, SamplingParams(), system, stdin=io.StringIO(typed), stdout=out)
    return recorder.calls, out.getvalue()


def test_history_and_clear(monkeypatch):
    calls, out = run_chat(monkeypatch, "hi\nmore\nclear\nagain\nexit\nignored\n", system="S")
    assert [m["content"] for m in calls[1]] == ["S", "hi", "answer1", "more"]
    assert [m["content"] for m in calls[2]] == ["S", "again"]
    assert len(calls) == 3 and "answer3" in out


def test_multi_line_and_reset_system(monkeypatch):
    typed = "multi-line\nline one\nline two#\nsingle-line\nreset-system\nNew sys\nq\n"
    calls, _ = run_chat(monkeypatch, typed)
    assert calls[0][-1]["content"] == "line one\nline two"
    assert calls[1] == [{"role": "system", "content": "New sys"}, {"role": "user", "content": "q"}]


def test_end_of_input_ends_chat(monkeypatch):
    calls, _ = run_chat(monkeypatch, "quit\n")
    assert calls == []


def test_batch_infer_rows(tiny_llama, smol_tokenizer, tmp_path):
    conversations = [
        [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "ref1"}],
        [{"role": "user", "content": "q2"}],
        [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "ref3"}],
    ]
    params = SamplingParams(max_new_tokens=4)
    path = tmp_path / "out" / "result.jsonl"
    chat.batch_infer(tiny_llama, smol_tokenizer, conversations, params, "Sys", path, batch_size=2)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["query"] for r in rows] == ["q1", "q2", "q3"]
    assert [r["labels"] for r in rows] == ["ref1", None, "ref3"]
    expected = generate(tiny_llama, smol_tokenizer, [rows[1]["messages"]], params)[0]
    assert rows[1]["response"] == expected.text
    assert rows[0]["messages"][0] == {"role": "system", "content": "Sys"}
    assert all(r["completion_tokens"] <= 4 and r["latency_s"] > 0 for r in rows)
    assert not list(path.parent.glob(".*tmp*"))


@pytest.mark.slow
def test_embedded_model_knows_paris(smol_model):
    model, tokenizer = smol_model
    question = [{"role": "user", "content": "What is the capital of France?"}]
    (answer,) = generate(model, tokenizer, [question], SamplingParams(max_new_tokens=32))
    assert "Paris" in answer.text
