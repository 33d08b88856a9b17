"""Row formats and files to conversations; errors name file, row and field."""

import json
import sys

import pytest

from selftune.data.formats import load_dataset_files, load_file
from selftune.errors import SelftuneError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def sys_msg(text):
    return {"role": "system", "content": text}


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def test_alpaca_with_history_and_system(tmp_path):
    row = {
        "system": "Be brief.",
        "history": [["Hi", "Hello!"], ["2+2?", "4"]],
        "instruction": "Translate",
        "input": "bonjour",
        "output": "hello",
    }
    plain = {"instruction": "Say yes", "input": "", "output": "yes"}
    got = load_file(write_jsonl(tmp_path / "a.jsonl", [row, plain]))
    assert got == [
        [
            sys_msg("Be brief."),
            user("Hi"),
            bot("Hello!"),
            user("2+2?"),
            bot("4"),
            user("Translate\nbonjour"),
            bot("hello"),
        ],
        [user("Say yes"), bot("yes")],
    ]


def test_messages_format_with_from_value_variant(tmp_path):
    rows = [
        {"messages": [sys_msg("S"), user("q1"), bot("a1"), user("q2"), bot("a2")]},
        {"messages": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    ]
    path = tmp_path / "m.json"
    path.write_text(json.dumps(rows), "utf-8")
    assert load_file(path) == [
        [sys_msg("S"), user("q1"), bot("a1"), user("q2"), bot("a2")],
        [user("q"), bot("a")],
    ]


def test_sharegpt(tmp_path):
    row = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "你好"},
            {"from": "gpt", "value": "你好!"},
            {"from": "user", "value": "again"},
            {"from": "assistant", "value": "sure"},
        ]
    }
    top_system = {
        "system": "T",
        "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
    }
    got = load_file(write_jsonl(tmp_path / "s.jsonl", [row, top_system]))
    assert got == [
        [sys_msg("S"), user("你好"), bot("你好!"), user("again"), bot("sure")],
        [sys_msg("T"), user("q"), bot("a")],
    ]


def test_query_response_with_history_and_system(tmp_path):
    row = {"system": "S", "history": [["q0", "a0"]], "query": "q1", "response": "a1"}
    path = write_jsonl(tmp_path / "q.jsonl", [row, {"query": "x", "response": 3}])
    got = load_file(path, coerce_text=True)
    assert got == [
        [sys_msg("S"), user("q0"), bot("a0"), user("q1"), bot("a1")],
        [user("x"), bot("3")],
    ]


def test_csv_with_empty_cells_and_json_history(tmp_path):
    path = tmp_path / "d.csv"
    history = json.dumps([["hi", "hello"]]).replace('"', '""')
    path.write_text(
        "instruction,input,output,system,history\n"
        f'"multi\nline",,out1,,"{history}"\n'
        "q2,extra,out2,Be kind,\n",
        "utf-8",
    )
    assert load_file(path) == [
        [user("hi"), bot("hello"), user("multi\nline"), bot("out1")],
        [sys_msg("Be kind"), user("q2\nextra"), bot("out2")],
    ]


def test_json_list_and_object_holding_a_list(tmp_path):
    rows = [{"query": "q", "response": "r"}]
    as_list, as_object = tmp_path / "l.json", tmp_path / "o.json"
    as_list.write_text(json.dumps(rows), "utf-8")
    as_object.write_text(json.dumps({"version": 1, "data": rows}), "utf-8")
    assert load_file(as_list) == load_file(as_object) == [[user("q"), bot("r")]]


def test_broken_jsonl_line_7_names_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(['{"query": "q", "response": "r"}'] * 6 + ['{"query": "q",']))
    with pytest.raises(SelftuneError) as info:
        load_file(path)
    assert "data.jsonl line 7: not valid JSON" in str(info.value)


def test_broken_json_names_the_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n{"query": "q", "response": "r"},\n{"query": \n]')
    with pytest.raises(SelftuneError, match=r"data\.json: not valid JSON: .*line 4"):
        load_file(path)


@pytest.mark.parametrize("answer", ["", "   \n", None])
def test_row_without_assistant_text_names_row_and_fields(tmp_path, answer):
    rows = [{"instruction": "a", "input": "", "output": "b"}]
    rows.append({"instruction": "q", "input": "x", "output": answer})
    with pytest.raises(SelftuneError) as info:
        load_file(write_jsonl(tmp_path / "d.jsonl", rows))
    message = str(info.value)
    assert "d.jsonl line 2" in message and "'output'" in message
    assert "row has fields: instruction, input, output" in message


def test_messages_row_without_assistant_names_index(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"messages": [user("q"), bot("a")]}, {"messages": [user("q")]}]))
    with pytest.raises(SelftuneError, match=r"m\.json \[1\]: no assistant text .*fields: messages"):
        load_file(path)
    path.write_text(json.dumps([{"messages": [user("q"), bot(" ")]}]))
    with pytest.raises(SelftuneError, match=r"\[0\]: no assistant text in 'messages\[1\]'"):
        load_file(path)


def test_unknown_format_lists_fields_seen(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [{"prompt_text": "q", "answer_text": "a"}])
    with pytest.raises(
        SelftuneError,
        match="u.jsonl line 1: unknown row format; fields seen: prompt_text, answer_text",
    ):
        load_file(path)


def test_unknown_role_and_late_system_are_errors(tmp_path):
    path = write_jsonl(
        tmp_path / "r.jsonl", [{"messages": [user("q"), {"role": "tool", "content": "x"}]}]
    )
    with pytest.raises(SelftuneError, match=r"line 1: messages\[1\]: unknown role 'tool'"):
        load_file(path)
    write_jsonl(path, [{"messages": [user("q"), sys_msg("s"), bot("a")]}])
    with pytest.raises(SelftuneError, match="system message must come first"):
        load_file(path)


def test_empty_file_says_so(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(SelftuneError, match="empty.jsonl: the file has no rows"):
        load_file(path)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(SelftuneError, match="no such file"):
        load_dataset_files([str(tmp_path / "nope.jsonl")])
    other = tmp_path / "d.txt"
    other.write_text("x")
    with pytest.raises(SelftuneError, match="unknown file type"):
        load_dataset_files([str(other)])


def test_hub_id_without_datasets_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(SelftuneError, match="install the `datasets` package"):
        load_dataset_files(["someone/some-dataset"])


def test_dataset_files_for_inference_keep_open_questions(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [{"messages": [user("Hi")]}])
    second = write_jsonl(
        tmp_path / "b.jsonl",
        [{"instruction": "Say yes", "output": ""}, {"query": "q", "response": "r"}],
    )
    assert load_dataset_files([str(first), str(second)]) == [
        [user("Hi")],
        [user("Say yes")],
        [user("q"), bot("r")],
    ]
    with pytest.raises(SelftuneError, match="no assistant text"):
        load_file(first)


def test_jsonl_lines_are_counted_on_newlines_only(tmp_path):
    path = tmp_path / "sep.jsonl"
    row = '{"query": "a\u2028b", "response": "r"}\n'
    path.write_text(row * 2 + "nope\n", "utf-8")
    with pytest.raises(SelftuneError, match="sep.jsonl line 3"):
        load_file(path)
    path.write_text(row, "utf-8")
    assert load_file(path) == [[user("a\u2028b"), bot("r")]]


@pytest.mark.parametrize("value", [42, 4.5, float("nan"), None])
def test_an_answer_that_is_not_text_names_file_line_and_field(tmp_path, value):
    """Numbers (JSON NaN included) and null where the answer belongs are errors, not the text
    "42" or "nan"; --coerce_text trains on numbers as their text."""
    rows = [{"instruction": "q", "output": "a"}, {"instruction": "q", "output": value}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", "utf-8")  # NaN as JSON has it
    with pytest.raises(SelftuneError) as caught:
        load_file(path)
    message = str(caught.value)
    assert message.startswith(f"{path} line 2:") and "'output'" in message
    if value is None:
        return
    assert "--coerce_text" in message
    assert load_file(path, coerce_text=True)[1][-1] == bot(str(value))


def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    good = json.dumps({"query": "q", "response": "a"}).encode()
    path.write_bytes(good + b"\n" + good + b"\n" + b'{"query": "caf\xe9", "response": "a"}\n')
    with pytest.raises(SelftuneError, match=r"latin.jsonl line 3: not UTF-8 text \(byte 0xe9"):
        load_file(path)


def test_a_byte_order_mark_is_skipped_and_said(tmp_path, caplog):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"query": "q", "response": "a"}).encode())
    with caplog.at_level("INFO"):
        assert load_file(path) == [[user("q"), bot("a")]]
    assert any("byte order mark" in r.getMessage() for r in caplog.records)


def test_rows_remember_where_they_were_read(tmp_path):
    path = write_jsonl(tmp_path / "o.jsonl", [{"query": "q", "response": "a"}] * 2)
    assert [row.origin for row in load_file(path)] == [f"{path} line 1", f"{path} line 2"]
