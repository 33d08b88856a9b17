"""`selftune identity`: write the built-in identity dataset, filled in, for users to read or edit."""

from __future__ import annotations

from pathlib import Path

from selftune.args import IdentityArgs
from selftune.data.identity import parse_identity_values, write_identity_file

ARGS = IdentityArgs


def run(args: IdentityArgs) -> int:
    values = parse_identity_values(args.model_name, args.model_author)
    output = Path(args.output)
    counts = write_identity_file(values, output)
    print(f"wrote {sum(counts.values())} rows ({counts['zh']} zh, {counts['en']} en) to {output}")
    return 0
