"""`selftune serve`: load the model and its adapters once, then answer the OpenAI API and the web
chat page until interrupted."""

from __future__ import annotations

import logging

from selftune.args import ServeArgs
from selftune.errors import UsageError

ARGS = ServeArgs
log = logging.getLogger(__name__)


def check_args(args: ServeArgs) -> None:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: use 0 to 65535 (0: any free port)")
    if args.max_batch_size < 1:
        raise UsageError("--max_batch_size must be at least 1")
    if args.max_body_bytes < 1024:
        raise UsageError("--max_body_bytes must be at least 1024")
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api_key is empty")


def run(args: ServeArgs) -> int:
    check_args(args)
    from selftune.serve.app import create_app, listen, server_for, url_of
    from selftune.serve.engine import load_engine, parse_adapter_spec

    for spec in args.adapters:  # a bad checkpoint path fails before the model loads
        parse_adapter_spec(spec)
    sock = listen(args.host, args.port)  # so does a busy port
    engine = load_engine(args)
    app = create_app(engine, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
    url = url_of(sock)
    names = ", ".join(engine.models)
    print(f"selftune serve: {url}/ (web chat), {url}/v1 (OpenAI API), models: {names}", flush=True)
    try:
        server_for(app).run(sockets=[sock])
    finally:
        engine.close()
    return 0
