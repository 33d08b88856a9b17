"""`name#N` sampling, mixing determinism, up-front checks, the eval split."""

import json
from collections import Counter

import pytest

from selftune.data.identity import IdentityValues
from selftune.data.mix import (
    DatasetSpec,
    check_datasets,
    check_specs,
    load_mixture,
    parse_spec,
    split,
    uses_identity,
)
from selftune.errors import SelftuneError, UsageError

VALUES = IdentityValues("星河", "Xinghe", "北辰实验室", "Beichen Lab")


def rows_file(tmp_path, name, n):
    path = tmp_path / f"{name}.jsonl"
    rows = [{"query": f"{name} q{i}", "response": f"a{i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def queries(conversations):
    return [c[0]["content"] for c in conversations]


def mixture(specs, seed=42, identity=None, variants=False):
    return load_mixture(specs, seed, identity, None, None, variants)


def test_parse_spec(tmp_path):
    assert parse_spec("data.jsonl") == DatasetSpec("data.jsonl")
    assert parse_spec("swift/self-cognition#500") == DatasetSpec("swift/self-cognition", 500)
    assert parse_spec("swift/self-cognition#500").is_identity
    odd = tmp_path / "run#3.jsonl"
    odd.write_text("")
    assert parse_spec(str(odd)) == DatasetSpec(str(odd))
    for bad in ("data.jsonl#0", "data.jsonl#many"):
        with pytest.raises(UsageError, match="row count"):
            parse_spec(bad)
    assert uses_identity(["a.jsonl", "identity#10"]) and not uses_identity(["a.jsonl"])


def test_count_below_size_samples_without_replacement(tmp_path):
    path = rows_file(tmp_path, "d", 20)
    got = queries(mixture([f"{path}#7"]))
    assert len(got) == 7 and len(set(got)) == 7
    assert set(got) <= set(queries(mixture([path])))


def test_count_above_size_is_whole_copies_plus_a_sample(tmp_path):
    path = rows_file(tmp_path, "d", 6)
    counts = Counter(queries(mixture([f"{path}#20"])))
    assert sum(counts.values()) == 20 and len(counts) == 6
    assert all(count in (3, 4) for count in counts.values())  # floor(20/6) = 3, plus 2 extra
    assert sum(count == 4 for count in counts.values()) == 2


def test_mixing_is_deterministic_by_seed(tmp_path):
    specs = [rows_file(tmp_path, "a", 30), f"{rows_file(tmp_path, 'b', 10)}#25"]
    first = queries(mixture(specs, seed=1))
    assert first == queries(mixture(specs, seed=1))
    assert first != queries(mixture(specs, seed=2))
    assert sorted(first) != first  # shuffled, not concatenated
    sources = Counter(q.split()[0] for q in first)
    assert sources == {"a": 30, "b": 25}


def test_identity_needs_values_before_anything_loads(tmp_path):
    with pytest.raises(UsageError, match="--model_name"):
        check_specs([rows_file(tmp_path, "d", 2), "swift/self-cognition#500"], None)


def test_missing_file_fails_up_front(tmp_path):
    with pytest.raises(SelftuneError, match="missing.jsonl: no such file"):
        check_specs([rows_file(tmp_path, "d", 2), str(tmp_path / "missing.jsonl#3")], None)


def test_identity_in_a_mixture(tmp_path, identity_files):
    plain = mixture(["identity", rows_file(tmp_path, "d", 3)], identity=VALUES)
    assert len(plain) == 4 + 3
    varied = mixture(["identity#10"], identity=VALUES, variants=True)
    assert len(varied) == 10 and all(c[0]["role"] == "system" for c in varied)


def test_split_holds_out_a_seeded_share(tmp_path):
    rows = mixture([rows_file(tmp_path, "d", 50)])
    train, val = split(rows, 0.1, seed=3)
    assert len(val) == 5 and len(train) == 45
    assert sorted(queries(train + val)) == sorted(queries(rows))
    assert split(rows, 0.1, seed=3) == (train, val)
    assert split(rows, 0.0, seed=3) == (rows, [])
    assert len(split(rows[:2], 0.01, seed=3)[1]) == 1


def test_check_datasets_reads_every_row_up_front(tmp_path):
    good = rows_file(tmp_path, "good", 4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "response": "r"}\n' * 6 + "{broken\n")
    with pytest.raises(SelftuneError, match="bad.jsonl line 7"):
        check_datasets([good, f"{bad}#3"], None)
    loaded = check_datasets([good, f"{good}#2"], None)
    assert list(loaded) == [good]
    assert mixture([good], seed=5) == load_mixture(
        [good], 5, None, None, None, False, loaded=loaded
    )
