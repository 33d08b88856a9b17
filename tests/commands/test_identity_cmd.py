"""`selftune identity` as a user runs it: the shipped dataset, filled in, written to a file."""

import json

from support import run_selftune as selftune


def test_identity_writes_the_filled_dataset(tmp_path):
    output = tmp_path / "x.jsonl"
    done = selftune(
        "identity",
        "--model_name",
        "星河",
        "Xinghe",
        "--model_author",
        "北辰实验室",
        "Beichen Lab",
        "--output",
        output,
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in output.read_text("utf-8").splitlines()]
    by_lang = {lang: [r for r in rows if r["lang"] == lang] for lang in ("zh", "en")}
    assert len(by_lang["zh"]) >= 150 and len(by_lang["en"]) >= 150
    contents = [m["content"] for r in rows for m in r["messages"]]
    assert not any("{" in text or "}" in text for text in contents)

    def answers(lang):
        return " ".join(r["messages"][-1]["content"] for r in by_lang[lang])

    assert "星河" in answers("zh") and "北辰实验室" in answers("zh")
    assert "Xinghe" in answers("en") and "Beichen Lab" in answers("en")
    assert "Xinghe" not in answers("zh") and "星河" not in answers("en")
    assert f"{len(by_lang['zh'])} zh, {len(by_lang['en'])} en" in done.stdout


def test_identity_without_a_name_writes_nothing(tmp_path):
    output = tmp_path / "x.jsonl"
    done = selftune("identity", "--model_author", "ACME", "--output", output)
    assert done.returncode == 2 and "--model_name" in done.stderr
    assert "Traceback" not in done.stderr and not output.exists()
