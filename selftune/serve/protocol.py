"""The OpenAI wire format: request bodies checked by pydantic, response and error shapes.

Unknown fields are ignored, as OpenAI clients send many optional ones; fields we accept but
cannot honour (n > 1, logprobs, penalties) are refused with a 400 naming the field rather than
silently dropped.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(
    message: str, kind: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    # "developer" is OpenAI's newer name for the system role.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    @field_validator("content")
    @classmethod
    def text_parts_only(cls, content: Any) -> Any:
        if isinstance(content, list) and any(part.type != "text" for part in content):
            raise ValueError("only text content parts are supported")
        return content

    def as_template_message(self) -> dict[str, str]:
        """The {"role", "content"} dict a chat template expects."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text or "" for part in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(extra="ignore")
    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    @field_validator("n")
    @classmethod
    def one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported (one choice per request)")
        return n

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def no_penalty(cls, value: float) -> float:
        if value != 0.0:
            raise ValueError("not supported; use repetition_penalty")
        return value

    @field_validator("stop")
    @classmethod
    def at_most_four(cls, stop: Any) -> Any:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop strings")
        return stop

    def stop_strings(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return [s for s in stop if s]

    def token_limit(self) -> int | None:
        return self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    kb: str | None = None  # a knowledge base the server holds (or the model alias MODEL+KB)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False

    @field_validator("logprobs")
    @classmethod
    def no_logprobs(cls, value: bool) -> bool:
        if value:
            raise ValueError("logprobs are not supported")
        return value

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def one_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str) and len(prompt) > 1:
            raise ValueError("only one prompt per request is supported")
        if not prompt:
            raise ValueError("the prompt is empty")
        return prompt

    @field_validator("echo", "logprobs", "suffix")
    @classmethod
    def unsupported(cls, value: Any) -> Any:
        if value:
            raise ValueError("not supported by this server")
        return value


class EmbeddingRequest(BaseModel):
    """/v1/embeddings, as OpenAI's: one text or a list of them."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    input: str | list[str]
    encoding_format: str = "float"

    @field_validator("input")
    @classmethod
    def some_text(cls, value: Any) -> Any:
        texts = [value] if isinstance(value, str) else value
        if not texts or len(texts) > 2048:
            raise ValueError("give 1 to 2048 texts")
        return value

    @field_validator("encoding_format")
    @classmethod
    def known_format(cls, value: str) -> str:
        if value not in ("float", "base64"):
            raise ValueError("use float or base64")
        return value

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


def embedding_response(model: str, vectors: Any, tokens: int, encoding: str) -> dict[str, Any]:
    """`encoding` base64: each vector's little-endian float32 bytes (what OpenAI's client asks
    for by default, and decodes itself)."""
    import base64

    import numpy as np

    def encoded(vector: Any) -> Any:
        if encoding == "base64":
            return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
        return [float(x) for x in vector]

    data = [
        {"object": "embedding", "index": i, "embedding": encoded(vector)}
        for i, vector in enumerate(vectors)
    ]
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def parse_request(raw: bytes, request_type: type[BaseModel]) -> Any:
    """Decode and check a body; any problem is one 400 naming the field."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return request_type.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{param}: {message}" if param else message, param=param) from exc


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_response(
    request_id: str,
    model: str,
    text: str,
    finish_reason: str,
    counts: dict[str, int],
    sources: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": finish_reason,
        "logprobs": None,
    }
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": counts,
        **({"sources": sources} if sources is not None else {}),
    }


def chat_chunk(
    request_id: str,
    model: str,
    delta: dict[str, str] | None,
    finish_reason: str | None = None,
    counts: dict[str, int] | None = None,
    sources: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One streamed event; with `counts` and no delta it is the final usage-only chunk; the
    chunk that finishes a knowledge-base answer carries its `sources`."""
    choices = []
    if delta is not None:
        choices = [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    chunk = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if counts is not None:
        chunk["usage"] = counts
    if sources is not None:
        chunk["sources"] = sources
    return chunk


def completion_response(
    request_id: str,
    model: str,
    text: str,
    finish_reason: str | None,
    counts: dict[str, int] | None,
    chunk: bool = False,
) -> dict[str, Any]:
    """A /v1/completions body; the streamed chunks have the same shape."""
    body = {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
    }
    if counts is not None or not chunk:
        body["usage"] = counts
    return body


def model_card(name: str, parent: str | None, created: int) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "selftune",
        "root": parent or name,
        "parent": parent,
    }
