"""`selftune sft`: check everything, read the data, then load the model and train."""

from __future__ import annotations

from selftune.args import SftArgs
from selftune.train.recipe import train_run

ARGS = SftArgs


def run(args: SftArgs) -> int:
    from selftune.train.distributed import ranks

    last = train_run(args)
    if ranks().main:
        print(f"last checkpoint: {last}")
    return 0
