"""`--dataset` values: `name#N` sampling (ms-swift semantics), mixing, shuffling, eval split.

`#N` counts rows as the source yields them; for the identity set that is after its system-prompt
variants, so `identity#500` gives 500 training rows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from selftune.data.formats import (
    Conversation,
    check_source,
    load_source,
    origin_of,
    with_origin,
)
from selftune.data.identity import ALIASES, IdentityValues, filled_pairs, identity_conversations
from selftune.errors import UsageError


@dataclass(frozen=True)
class DatasetSpec:
    source: str  # a file, a hub id, or one of identity.ALIASES
    count: int | None = None  # the N of `name#N`; None takes every row once

    @property
    def is_identity(self) -> bool:
        return self.source in ALIASES


def parse_spec(text: str) -> DatasetSpec:
    """`name` or `name#N`; a file whose own name contains `#` is taken whole."""
    source, sep, tail = text.rpartition("#")
    if not sep or Path(text).exists():
        return DatasetSpec(text)
    if not tail.isdigit() or int(tail) < 1:
        raise UsageError(
            f"--dataset {text}: after '#' give a row count of 1 or more, e.g. {source}#500"
        )
    return DatasetSpec(source, int(tail))


def uses_identity(specs: list[str]) -> bool:
    return any(parse_spec(text).is_identity for text in specs)


def check_specs(specs: list[str], identity: IdentityValues | None) -> list[DatasetSpec]:
    """Everything about the specs that can fail without reading rows: syntax, files that do
    not exist, the identity set named without --model_name/--model_author. Before model load."""
    parsed = [parse_spec(text) for text in specs]
    if not parsed:
        raise UsageError("no dataset given")
    for spec in parsed:
        if spec.is_identity:
            if identity is None:
                raise UsageError(
                    f"--dataset {spec.source} fills in a name and an author: "
                    "pass --model_name ZH [EN] and --model_author ZH [EN]"
                )
        else:
            check_source(spec.source)
    return parsed


def check_datasets(
    specs: list[str], identity: IdentityValues | None, coerce_text: bool = False
) -> dict[str, list[Conversation]]:
    """Read and check every row of every spec (and fill the identity set once) before the
    tokenizer or model is touched; returns the rows per source for `load_mixture(loaded=...)`,
    so nothing is read twice."""
    loaded: dict[str, list[Conversation]] = {}
    for spec in check_specs(specs, identity):
        if spec.is_identity:
            assert identity is not None
            filled_pairs(identity)  # the data reads and every placeholder fills
        elif spec.source not in loaded:
            loaded[spec.source] = load_source(spec.source, True, coerce_text)
    return loaded


def sample(rows: list[Conversation], count: int | None, rng: random.Random) -> list[Conversation]:
    """Fewer than the source has: a random sample without replacement. More: whole copies plus
    a random sample for the remainder."""
    if count is None:
        return list(rows)
    whole, remainder = divmod(count, len(rows))
    return rows * whole + [rows[i] for i in sorted(rng.sample(range(len(rows)), remainder))]


def load_mixture(
    specs: list[str],
    seed: int,
    identity: IdentityValues | None,
    system: str | None,
    default_system: str | None,
    variants: bool,
    loaded: dict[str, list[Conversation]] | None = None,
) -> list[Conversation]:
    """Every spec loaded (or taken from `loaded`, see check_datasets), sampled to its `#N`,
    then all mixed and shuffled with `seed`. `system`/`default_system`/`variants` shape the
    identity rows only (see data.identity)."""
    loaded = loaded or {}
    mixed: list[Conversation] = []
    for index, spec in enumerate(check_specs(specs, identity)):
        if spec.is_identity:
            assert identity is not None
            rows = identity_conversations(identity, system, default_system, variants, seed)
        elif spec.source in loaded:
            rows = loaded[spec.source]
        else:
            rows = load_source(spec.source, require_answer=True)
        rng = random.Random(f"sample:{seed}:{index}:{spec.source}")
        mixed += sample(rows, spec.count, rng)
    random.Random(f"shuffle:{seed}").shuffle(mixed)
    # copies, so that rows repeated by #N never share a message dict someone might edit
    return [
        with_origin([dict(message) for message in conversation], origin_of(conversation))
        for conversation in mixed
    ]


def split(
    conversations: list[Conversation], ratio: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """(train, val) for `--split_dataset_ratio`: a seeded share held out, at least one row each
    side when the ratio is above zero and there are two rows or more."""
    if not 0 <= ratio < 1:
        raise UsageError(f"--split_dataset_ratio {ratio}: use a value in [0, 1)")
    if ratio == 0 or len(conversations) < 2:
        return list(conversations), []
    n_val = min(len(conversations) - 1, max(1, round(len(conversations) * ratio)))
    order = list(range(len(conversations)))
    random.Random(f"split:{seed}").shuffle(order)
    val_ids = set(order[:n_val])
    train = [c for i, c in enumerate(conversations) if i not in val_ids]
    val = [c for i, c in enumerate(conversations) if i in val_ids]
    return train, val
