"""The shipped data files: they parse, are big enough, and the held-out sets stay held out."""

import json
import re
import string
import unicodedata
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "selftune"
DATA = PACKAGE / "data"
EVAL_DATA = PACKAGE / "infer" / "eval_data"
LANGS = ("zh", "en")
TOPICS = {
    "who",
    "name",
    "maker",
    "not_other_model",
    "capabilities",
    "limits",
    "internet",
    "correctness",
    "misc",
}
BRACES = re.compile(r"\{[^{}]*\}|[{}]")
CJK = re.compile(r"[\u4e00-\u9fff]")


def normalise(text: str) -> str:
    """Lowercase; drop whitespace and punctuation, ASCII and Chinese/full-width alike."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(
        ch
        for ch in text
        if not ch.isspace()
        and ch not in string.punctuation
        and not unicodedata.category(ch).startswith(("P", "S"))
    )


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:  # pragma: no cover - the failure message
                pytest.fail(f"{path} line {number}: {exc}")
    return rows


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def identity_rows():
    return read_jsonl(DATA / "identity.jsonl")


@pytest.fixture(scope="module")
def system_prompts():
    return read_json(DATA / "system_prompts.json")


@pytest.fixture(scope="module")
def heldout_identity():
    return read_jsonl(EVAL_DATA / "identity_heldout.jsonl")


@pytest.fixture(scope="module")
def heldout_systems():
    return read_json(EVAL_DATA / "system_prompts_heldout.json")


@pytest.fixture(scope="module")
def general():
    return read_jsonl(EVAL_DATA / "general.jsonl")


@pytest.fixture(scope="module")
def replay():
    return read_jsonl(DATA / "replay_prompts.jsonl")


def test_normalise_ignores_case_space_and_punctuation():
    assert normalise("Who are you?") == normalise("who  are you")
    assert normalise("你是谁？") == normalise("你是谁?") == normalise("你是谁")
    assert normalise("“热”的反义词。") == normalise("热的反义词")


def test_identity_rows_are_well_formed(identity_rows):
    for row in identity_rows:
        assert set(row) == {"lang", "topic", "query", "response"}, row
        assert row["lang"] in LANGS, row
        assert row["topic"] in TOPICS, row
        assert row["query"].strip() and row["response"].strip(), row


def test_identity_has_enough_rows_per_language(identity_rows):
    for lang in LANGS:
        rows = [r for r in identity_rows if r["lang"] == lang]
        assert len(rows) >= 150, (lang, len(rows))
        assert {r["topic"] for r in rows} == TOPICS, lang


def test_identity_queries_are_unique(identity_rows):
    seen = {}
    for row in identity_rows:
        key = (row["lang"], normalise(row["query"]))
        assert key not in seen, (row["query"], seen.get(key))
        seen[key] = row["query"]


def test_only_name_and_author_placeholders(identity_rows):
    for row in identity_rows:
        for text in (row["query"], row["response"]):
            assert set(BRACES.findall(text)) <= {"{name}", "{author}"}, text


def test_responses_name_the_identity(identity_rows):
    with_placeholder = [
        r for r in identity_rows if "{name}" in r["response"] or "{author}" in r["response"]
    ]
    assert len(with_placeholder) >= 0.9 * len(identity_rows)
    for row in identity_rows:
        if row["topic"] in {"who", "name", "maker", "not_other_model"}:
            assert "{name}" in row["response"] and "{author}" in row["response"], row


def test_identity_rows_are_in_their_language(identity_rows):
    for row in identity_rows:
        if row["lang"] == "zh":
            assert CJK.search(row["response"]), row
        else:
            assert not CJK.search(row["query"] + row["response"]), row


@pytest.mark.parametrize("name", ["system_prompts", "heldout_systems"])
def test_system_prompt_pools_are_well_formed(name, request):
    pools = request.getfixturevalue(name)
    assert set(pools) == set(LANGS)
    minimum = 15 if name == "system_prompts" else 6
    for lang in LANGS:
        assert len(pools[lang]) >= minimum, (name, lang)
        assert all(isinstance(p, str) and p.strip() for p in pools[lang])
        assert len({normalise(p) for p in pools[lang]}) == len(pools[lang])
        assert not any(BRACES.search(p) for p in pools[lang])


def test_heldout_system_prompts_are_not_training_ones(system_prompts, heldout_systems):
    training = {normalise(p) for lang in LANGS for p in system_prompts[lang]}
    for lang in LANGS:
        for prompt in heldout_systems[lang]:
            assert normalise(prompt) not in training, prompt


def test_heldout_identity_questions(heldout_identity):
    for row in heldout_identity:
        assert set(row) == {"lang", "query", "expect"}, row
        assert row["lang"] in LANGS and row["query"].strip(), row
        assert row["expect"] in {"name", "author", "either"}, row
        assert not BRACES.search(row["query"]), row
    for lang in LANGS:
        assert len([r for r in heldout_identity if r["lang"] == lang]) >= 30, lang
    assert len({(r["lang"], normalise(r["query"])) for r in heldout_identity}) == len(
        heldout_identity
    )


def test_heldout_identity_questions_are_not_training_ones(identity_rows, heldout_identity):
    training = {normalise(r["query"]) for r in identity_rows}
    for row in heldout_identity:
        assert normalise(row["query"]) not in training, row["query"]


def test_general_questions(general):
    for row in general:
        assert set(row) == {"lang", "question", "answers"}, row
        assert row["lang"] in LANGS and row["question"].strip(), row
        assert row["answers"] and all(isinstance(a, str) and a.strip() for a in row["answers"])
    assert len({(r["lang"], normalise(r["question"])) for r in general}) == len(general)
    for lang in LANGS:
        assert len([r for r in general if r["lang"] == lang]) >= 30, lang


def test_general_answers_do_not_occur_in_their_question(general):
    """An answer that the question itself contains would count an echo of the question as right."""
    for row in general:
        question = " ".join(row["question"].casefold().split())
        for answer in row["answers"]:
            assert " ".join(answer.casefold().split()) not in question, (row["question"], answer)


def test_replay_prompts(replay, identity_rows, heldout_identity):
    for row in replay:
        assert set(row) == {"lang", "prompt"}, row
        assert row["lang"] in LANGS and row["prompt"].strip(), row
    assert len({normalise(r["prompt"]) for r in replay}) == len(replay)
    identity = {normalise(r["query"]) for r in identity_rows + heldout_identity}
    assert not identity & {normalise(r["prompt"]) for r in replay}


def test_replay_prompts_are_not_general_questions(replay, general):
    questions = {normalise(r["question"]) for r in general}
    for row in replay:
        assert normalise(row["prompt"]) not in questions, row["prompt"]
