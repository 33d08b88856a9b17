"""`selftune serve`: load the model and its adapters, then serve the OpenAI API and the web page."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

from selftune.args import ServeArgs
from selftune.errors import SelftuneError, UsageError
from selftune.models.load import check_finite_weights, checkpoint_args, load_model

ARGS = ServeArgs
log = logging.getLogger(__name__)


def adapter_checkpoints(values: list[str]) -> dict[str, Path]:
    """`name=CKPT` or `CKPT` (named after its folder) -> {name: folder}, checked before any
    weights load."""
    checkpoints: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or "/" in name or not name:  # no name given, or the "=" is in the path
            name, path = Path(value).name, value
        checkpoint = Path(path).expanduser()
        if (checkpoint / "config.json").is_file():
            raise UsageError(
                f"--adapters {value}: a full checkpoint, not an adapter; serve it with --model"
            )
        if not (checkpoint / "adapter_config.json").is_file():
            raise UsageError(f"--adapters {value}: not a LoRA checkpoint (no adapter_config.json)")
        if name in checkpoints:
            raise UsageError(f"--adapters: the name '{name}' is given twice; use name=CKPT")
        checkpoints[name] = checkpoint
    return checkpoints


def base_model_name(spec: str) -> str:
    """The API name of the base model: the --model spec, or a local path's folder name."""
    path = Path(spec).expanduser()
    if path.exists():
        return path.stem if path.is_file() else path.name
    return spec


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound here so port 0 resolves to the real port before we print it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise SelftuneError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def open_knowledge(values: list[str], top_k: int, threshold: float) -> dict[str, Any]:
    """--kb NAME or NAME=PATH: each knowledge base opened (its embedder loaded) at start-up."""
    from selftune.kb.answer import Grounder
    from selftune.kb.retrieve import open_kb

    knowledge: dict[str, Any] = {}
    for value in values:
        name, _, where = value.partition("=")
        if not name or "+" in name or name in knowledge:
            raise UsageError(f"--kb {value}: give each knowledge base its own name, without '+'")
        knowledge[name] = Grounder(open_kb(where or name), top_k, threshold)
    return knowledge


def run(args: ServeArgs) -> int:
    import torch
    import uvicorn

    from selftune.infer.sampling import sampling_from_args
    from selftune.serve.app import ServerConfig, create_app
    from selftune.serve.engine import Engine, ServedModel, load_adapters

    checkpoints = adapter_checkpoints(args.adapters)
    for checkpoint in checkpoints.values():  # before the port opens and the model loads
        check_finite_weights(checkpoint)
    spec = args.model
    if not spec and checkpoints:
        spec = checkpoint_args(next(iter(checkpoints.values()))).get("model")
    if not spec:
        raise UsageError("no model given: pass --model, or --adapters with a selftune checkpoint")
    name = args.served_model_name or base_model_name(spec)
    if name in checkpoints:
        raise UsageError(f"--adapters: '{name}' is the base model's name; pick another name")
    knowledge = open_knowledge(args.kb, args.kb_top_k, args.kb_threshold)
    sock = listen(args.host, args.port)

    model, tokenizer, _ = load_model(spec, args.torch_dtype, args.device, args.quant_bits)
    served = [ServedModel(name)]
    if checkpoints:
        model, adapters = load_adapters(model, checkpoints, parent=name)
        served += adapters
    if args.system is not None:  # the flag is every model's default system prompt
        for each in served:
            each.system = args.system
    defaults = sampling_from_args(args, model.generation_config)
    defaults.seed = None  # a request's seed, or none: one shared seed would repeat answers
    torch.manual_seed(args.seed)

    engine = Engine(model, tokenizer, args.max_batch_size).start()
    config = ServerConfig(served, defaults, args.api_key, args.max_body_bytes, knowledge)
    app = create_app(engine, config)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    names = ", ".join(each.name for each in served)
    print(f"serving {names} at http://{shown}:{port} (web chat at /, API at /v1)", flush=True)
    try:
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.close()
    return 0
