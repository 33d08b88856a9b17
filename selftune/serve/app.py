"""The routes: OpenAI's /v1/models, /v1/chat/completions and /v1/completions, /health, and the
web chat page at /. Every error is answered in OpenAI's shape and the server keeps serving."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from selftune.infer.generate import Completion, context_length, render_prompt
from selftune.infer.sampling import SamplingParams
from selftune.serve.engine import Engine, Job, ServedModel
from selftune.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    SamplingRequest,
    chat_chunk,
    chat_response,
    completion_response,
    embedding_response,
    error_body,
    model_card,
    new_id,
    parse_request,
    usage,
)

T = TypeVar("T")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering


@dataclass
class ServerConfig:
    """What the routes need besides the engine."""

    models: list[ServedModel]
    defaults: SamplingParams  # flags and the model's generation_config; requests override
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    # knowledge bases by name: a request names one in `kb`, or as the model alias MODEL+KB
    knowledge: dict[str, Callable[..., Any]] = field(default_factory=dict)


class ClientGone(Exception):
    """The client hung up before its answer was ready."""


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes without reading it all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes is over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so its decode) if the client hangs up first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()  # takes effect at the task's next await, not here
    if not task.done() or task.cancelled():
        raise ClientGone()
    return task.result()


def sse(data: dict[str, Any] | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n"


def sampling_for(body: SamplingRequest, defaults: SamplingParams) -> SamplingParams:
    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    return SamplingParams(
        temperature=pick(body.temperature, defaults.temperature),
        top_p=pick(body.top_p, defaults.top_p),
        top_k=pick(body.top_k, defaults.top_k),
        repetition_penalty=pick(body.repetition_penalty, defaults.repetition_penalty),
        max_new_tokens=pick(body.token_limit(), defaults.max_new_tokens),
        stop=body.stop_strings(),
        seed=body.seed,
    )


def chat_messages(body: ChatRequest, served: ServedModel) -> list[dict[str, str]]:
    """The request's messages, with the model's default system prompt when it sends none."""
    messages = [message.as_template_message() for message in body.messages]
    if served.system is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": served.system})
    return messages


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    """The FastAPI app over a started engine."""
    app = FastAPI(title="selftune", docs_url=None, redoc_url=None, openapi_url=None)
    by_name = {served.name: served for served in config.models}
    context = context_length(engine.model)
    vocab_size = len(engine.tokenizer)
    created = int(time.time())
    page = (resources.files("selftune.serve") / "static" / "index.html").read_text("utf-8")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = error_body(str(exc.detail), "invalid_request_error", code=str(exc.status_code))
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed"

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        body = error_body(f"{type(exc).__name__}: {exc}", "server_error", code="internal_error")
        return JSONResponse(body, status_code=500)

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        expected = f"Bearer {config.api_key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            reason = "missing" if not given else "wrong"
            raise ApiError(
                401,
                f"{reason} API key: send the header 'Authorization: Bearer KEY'",
                code="invalid_api_key",
                kind="authentication_error",
            )

    def pick_knowledge(body: ChatRequest) -> tuple[ServedModel, Callable[..., Any] | None]:
        """The model and knowledge base a chat request asks for: `kb`, or MODEL+KB."""
        name, kb = body.model, body.kb
        if name not in by_name and "+" in name:
            name, kb = name.rsplit("+", 1)
        served = pick_model(name, body.model)
        if kb is None:
            return served, None
        if kb not in config.knowledge:
            known = ", ".join(config.knowledge) or "none"
            raise ApiError(
                404, f"knowledge base '{kb}' is not served here; this server has: {known}", "kb"
            )
        return served, config.knowledge[kb]

    def pick_model(name: str, asked: str | None = None) -> ServedModel:
        if name not in by_name:
            known = ", ".join(by_name)
            raise ApiError(
                404,
                f"model '{asked or name}' does not exist; this server has: {known}",
                param="model",
                code="model_not_found",
            )
        return by_name[name]

    def render_chat(messages: list[dict[str, str]]) -> list[int]:
        try:
            return render_prompt(engine.tokenizer, messages)
        except Exception as exc:  # e.g. a template that wants user/assistant turns to alternate
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            message = f"messages: the chat template refused them: {reason}"
            raise ApiError(400, message, "messages") from exc

    def check_length(prompt: list[int], param: str) -> None:
        if len(prompt) >= context:
            raise ApiError(
                400,
                f"the prompt is {len(prompt)} tokens; the model's context is {context}",
                param=param,
                code="context_length_exceeded",
            )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        load = {
            "active_rows": engine.active_rows,
            "queued": engine.queue.qsize(),
            "decodes": engine.decodes,  # batches run so far; rows / decodes = batching
            "rows": engine.rows_decoded,
        }
        return {"status": "ok", "models": list(by_name), **load}

    @app.get("/", response_class=HTMLResponse)
    async def web_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def list_models() -> dict[str, Any]:
        cards = [model_card(m.name, m.parent, created) for m in config.models]
        cards += [
            model_card(f"{m.name}+{kb}", m.name, created)
            for m in config.models
            for kb in config.knowledge
        ]
        return {"object": "list", "data": cards}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(request: Request) -> Any:
        body = parse_request(await read_body(request, config.max_body_bytes), ChatRequest)
        served, ground = pick_knowledge(body)
        messages, sources = chat_messages(body, served), None
        if ground is not None:  # the passages go into the last user turn; the system stays
            messages, sources = await asyncio.to_thread(ground, messages)
        prompt = await asyncio.to_thread(render_chat, messages)
        check_length(prompt, "messages")
        job = Job(prompt, sampling_for(body, config.defaults), served.adapter)
        request_id = new_id("chatcmpl")
        if body.stream:
            events = stream_chat(job, request_id, body.model, body.include_usage(), sources)
            return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
        done = await unless_disconnected(request, engine.complete(job))
        counts = usage(done.prompt_tokens, done.completion_tokens)
        return chat_response(request_id, body.model, done.text, done.finish_reason, counts, sources)

    async def stream_chat(
        job: Job,
        request_id: str,
        model: str,
        include_usage: bool,
        sources: list[dict[str, Any]] | None = None,
    ) -> AsyncIterator[str]:
        yield sse(chat_chunk(request_id, model, {"role": "assistant", "content": ""}))
        done = None
        async for piece in answer_pieces(job):
            if isinstance(piece, Completion):
                done = piece
            elif isinstance(piece, str):
                yield sse(chat_chunk(request_id, model, {"content": piece}))
            else:
                yield sse(piece)  # an error body: the 200 status line has already gone out
        if done is not None:
            yield sse(chat_chunk(request_id, model, {}, done.finish_reason, sources=sources))
            if include_usage:
                counts = usage(done.prompt_tokens, done.completion_tokens)
                yield sse(chat_chunk(request_id, model, None, counts=counts))
        yield sse("[DONE]")

    async def answer_pieces(job: Job) -> AsyncIterator[str | Completion | dict[str, Any]]:
        """The engine's events, with a failure turned into an OpenAI error body."""
        try:
            async with aclosing(engine.stream(job)) as events:
                async for event in events:
                    yield event
        except Exception as exc:
            yield error_body(f"{type(exc).__name__}: {exc}", "server_error", code="internal_error")

    @app.post("/v1/embeddings", dependencies=[Depends(check_key)])
    async def embeddings(request: Request) -> Any:
        """The knowledge bases' embedder (the default one where none is served), as passage
        vectors, so that other tools index alike."""
        body = parse_request(await read_body(request, config.max_body_bytes), EmbeddingRequest)
        embedder = await asyncio.to_thread(knowledge_embedder)
        if body.model not in (None, embedder.name):
            raise ApiError(
                404, f"model '{body.model}': this server embeds with {embedder.name}", "model"
            )
        texts = body.texts()
        vectors = await asyncio.to_thread(embedder.passages, texts)
        tokens = sum(len(engine.tokenizer(text)["input_ids"]) for text in texts)
        return embedding_response(embedder.name, vectors, tokens, body.encoding_format)

    embedders: list[Any] = []

    def knowledge_embedder() -> Any:
        if not embedders:
            grounders = list(config.knowledge.values())
            if grounders:
                embedders.append(grounders[0].kb.embedder)
            else:
                from selftune.kb.embed import load_embedder

                embedders.append(load_embedder())
        return embedders[0]

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(request: Request) -> Any:
        body = parse_request(await read_body(request, config.max_body_bytes), CompletionRequest)
        served = pick_model(body.model)
        prompt = await asyncio.to_thread(prompt_ids, body.prompt)
        check_length(prompt, "prompt")
        job = Job(prompt, sampling_for(body, config.defaults), served.adapter)
        request_id = new_id("cmpl")
        if body.stream:
            events = stream_completion(job, request_id, body.model, body.include_usage())
            return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
        done = await unless_disconnected(request, engine.complete(job))
        counts = usage(done.prompt_tokens, done.completion_tokens)
        return completion_response(request_id, body.model, done.text, done.finish_reason, counts)

    def prompt_ids(prompt: str | list[int] | list[str]) -> list[int]:
        if isinstance(prompt, list) and isinstance(prompt[0], int):
            if any(not 0 <= token < vocab_size for token in prompt):
                raise ApiError(400, f"prompt: token ids must be in [0, {vocab_size})", "prompt")
            return list(prompt)
        text = prompt if isinstance(prompt, str) else prompt[0]
        return engine.tokenizer(text, add_special_tokens=True)["input_ids"]

    async def stream_completion(
        job: Job, request_id: str, model: str, include_usage: bool
    ) -> AsyncIterator[str]:
        async for piece in answer_pieces(job):
            if isinstance(piece, Completion):
                counts = usage(piece.prompt_tokens, piece.completion_tokens)
                last = counts if include_usage else None
                yield sse(
                    completion_response(request_id, model, "", piece.finish_reason, last, True)
                )
            elif isinstance(piece, str):
                yield sse(completion_response(request_id, model, piece, None, None, chunk=True))
            else:
                yield sse(piece)
        yield sse("[DONE]")

    return app
