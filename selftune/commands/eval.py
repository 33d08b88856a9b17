"""`selftune eval`: prove the identity took and the general skills stayed."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from selftune.args import EvalArgs
from selftune.atomic import write_json_atomic
from selftune.errors import SelftuneError
from selftune.infer.evaluate import (
    Identity,
    markdown,
    run_eval,
)

ARGS = EvalArgs
log = logging.getLogger(__name__)


def run(args: EvalArgs) -> int:
    from selftune.data.identity import model_default_system
    from selftune.models.load import checkpoint_args, load_for_inference

    if not args.adapters:
        raise SelftuneError(
            "selftune eval compares a tuned model with its base: pass --adapters CKPT"
        )
    saved = checkpoint_args(Path(args.adapters[0]))
    names = args.model_name or saved.get("model_name") or []
    authors = args.model_author or saved.get("model_author") or []
    if not names or not authors:
        raise SelftuneError(
            "the checkpoint names no identity: pass --model_name and --model_author"
        )
    train_system = args.system if args.system is not None else saved.get("system")
    args_for_load = dataclasses.replace(args, system=train_system)
    loaded = load_for_inference(args_for_load)
    report = run_eval(
        loaded, Identity(names, authors), train_system, model_default_system(loaded.tokenizer), args
    )
    table = markdown(report)
    print(table)
    output = Path(args.output) if args.output else Path(args.adapters[0]) / "eval.json"
    write_json_atomic(
        output,
        {
            **dataclasses.asdict(report),
            "markdown": table,
            "identity_names": names,
            "identity_authors": authors,
        },
    )
    log.info("wrote %s", output)
    return 0
