"""The HTTP API on a real server: the official `openai` client, 16 concurrent clients, every error
of the table (the server answering /health after each), a client leaving mid-stream."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from selftune.args import ServeArgs, parse_args
from selftune.generate import SamplingParams, generate

PARIS = [{"role": "user", "content": "What is the capital of France?"}]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def sse_payloads(lines) -> list[str]:
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


def streamed_text(payloads: list[str]) -> str:
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


def test_serve_flags():
    args = parse_args(
        ServeArgs,
        ["--model", "m", "--adapters", "me=/ckpt/a", "/ckpt/b", "--port", "0", "--api_key", "k"],
        prog="selftune serve",
    )
    assert args.adapters == ["me=/ckpt/a", "/ckpt/b"] and args.port == 0 and args.api_key == "k"
    assert (args.host, args.max_batch_size) == ("127.0.0.1", 16)


def test_models_lists_the_base_and_each_adapter(tiny_server):
    listed = httpx.get(f"{tiny_server.url}/v1/models", headers=auth(tiny_server.key)).json()
    rows = {m["id"]: m["parent"] for m in listed["data"]}
    assert rows == {"tiny": None, "alpha": "tiny", "beta": "tiny"}


def test_sixteen_concurrent_clients_one_batch_no_cross_talk(
    tiny_server, tiny_requests, tiny_references
):
    """16 clients at once, over three model names, every fourth streaming: all succeed, they
    decode as one batch, and each gets the answer its model gives it alone."""
    engine = tiny_server.engine

    async def ask(client, i, name, messages, max_tokens):
        body = {"model": name, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
        if i % 4 == 0:
            body["stream"] = True
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                return streamed_text(sse_payloads([line async for line in response.aiter_lines()]))
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        reply = response.json()
        assert reply["model"] == name and reply["usage"]["completion_tokens"] <= max_tokens
        return reply["choices"][0]["message"]["content"]

    async def scenario():
        headers = auth(tiny_server.key)
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(
            base_url=tiny_server.url, headers=headers, limits=limits, timeout=60
        ) as client:
            engine.pause()  # hold the queue until all 16 are in: one batch, deterministically
            try:
                tasks = [
                    asyncio.create_task(ask(client, i, *request))
                    for i, request in enumerate(tiny_requests)
                ]
                assert await asyncio.to_thread(engine.wait_queued, 16)
            finally:
                engine.resume()
            return await asyncio.gather(*tasks)

    answers = asyncio.run(scenario())
    assert answers == tiny_references
    assert sorted(engine.batches[-1]) == sorted(name for name, _, _ in tiny_requests)


def test_text_completions_and_stop_sequences(tiny_server):
    engine, url, headers = tiny_server.engine, tiny_server.url, auth(tiny_server.key)
    prompt = "The capital of France is"
    ids = engine.prompt_tokenizer(prompt)["input_ids"]
    with engine.model.disable_adapter():  # the engine is idle: its model is ours a moment
        (alone,) = generate(
            engine.model, engine.tokenizer, [], SamplingParams(max_new_tokens=8), prompts=[ids]
        )
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0}
    reply = httpx.post(f"{url}/v1/completions", json=body, headers=headers).json()
    assert reply["object"] == "text_completion"
    assert reply["choices"][0]["text"] == alone.text
    assert reply["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 8, "total_tokens": len(ids) + 8}
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, headers=headers) as response:  # fmt: skip
        payloads = sse_payloads(response.iter_lines())
    assert payloads[-1] == "[DONE]"
    assert "".join(json.loads(p)["choices"][0]["text"] for p in payloads[:-1]) == alone.text
    stop = alone.text[len(alone.text) // 2 :][:3]
    reply = httpx.post(f"{url}/v1/completions", json={**body, "stop": [stop]}, headers=headers)
    choice = reply.json()["choices"][0]
    assert choice["text"] == alone.text[: alone.text.index(stop)]
    assert choice["finish_reason"] == "stop"


def long_chat(words: int) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "word " * words}]}


OK_CHAT = {"model": "tiny", "messages": PARIS, "max_tokens": 2}
ERRORS = {
    # name: (headers or "key", body: dict or raw bytes, status, code or param to expect)
    "unknown model": ("key", {**OK_CHAT, "model": "gpt-9"}, 404, "model_not_found"),
    "malformed JSON": ("key", b'{"model": "tiny", "messages": [', 400, "invalid_json"),
    "JSON not an object": ("key", b"[1, 2]", 400, None),
    "missing messages": ("key", {"model": "tiny"}, 400, "messages"),
    "bad role": ("key", {**OK_CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),  # fmt: skip
    "temperature out of range": ("key", {**OK_CHAT, "temperature": 7}, 400, "temperature"),
    "max_tokens zero": ("key", {**OK_CHAT, "max_tokens": 0}, 400, "max_tokens"),
    "n above 1": ("key", {**OK_CHAT, "n": 2}, 400, "n"),
    "image content": ("key", {**OK_CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, None),  # fmt: skip
    "missing API key": ({}, OK_CHAT, 401, "invalid_api_key"),
    "wrong API key": (auth("nope"), OK_CHAT, 401, "invalid_api_key"),
    "not a Bearer key": ({"Authorization": "Basic test-key"}, OK_CHAT, 401, "invalid_api_key"),
    "prompt longer than the context": ("key", long_chat(600), 400, "context_length_exceeded"),
    "body larger than the bound": ("key", long_chat(20_000), 413, "request_too_large"),
}


@pytest.mark.parametrize("case", ERRORS, ids=list(ERRORS))
def test_errors_in_openai_shape_and_the_server_stays_up(tiny_server, case):
    headers, body, status, expect = ERRORS[case]
    headers = auth(tiny_server.key) if headers == "key" else headers
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        f"{tiny_server.url}/v1/chat/completions",
        content=content,
        headers={**headers, "Content-Type": "application/json"},
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if expect is not None:
        assert expect in (error["code"], error["param"])
    assert httpx.get(f"{tiny_server.url}/health").status_code == 200
    ok = httpx.post(f"{tiny_server.url}/v1/chat/completions", json=OK_CHAT, headers=auth(tiny_server.key))  # fmt: skip
    assert ok.status_code == 200


def test_unknown_route_is_a_404_in_openai_shape(tiny_server):
    response = httpx.get(f"{tiny_server.url}/v1/nothing", headers=auth(tiny_server.key))
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_client_leaving_mid_stream_stops_its_generation(tiny_server):
    url, engine, max_tokens = tiny_server.url, tiny_server.engine, 480
    body = {**OK_CHAT, "max_tokens": max_tokens, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=auth(tiny_server.key)) as response:  # fmt: skip
        lines = response.iter_lines()
        chunks = [json.loads(p) for p in sse_payloads(next(lines) for _ in range(6))]
        request_id = chunks[0]["id"].removeprefix("chatcmpl-")
    # Leaving the `with` closed the connection before the answer ended.
    record = engine.wait_finished(request_id)
    assert record is not None and record.finish_reason == "cancelled"
    assert 0 < record.completion_tokens < max_tokens
    assert httpx.get(f"{url}/health").status_code == 200


@pytest.mark.slow
def test_openai_client_gets_paris_streaming_and_not(smol_server):
    """`selftune serve --model smollm2-135m` answered through the official client."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{smol_server}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="smollm2-135m", messages=PARIS, temperature=0, max_tokens=24
    )
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model="smollm2-135m", messages=PARIS, temperature=0, max_tokens=24, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == reply.choices[0].message.content


@pytest.mark.slow
def test_identity_adapter_answers_under_its_name_and_the_base_as_itself(smol_server, smol_model):
    from openai import OpenAI

    client = OpenAI(base_url=f"{smol_server}/v1", api_key="unused", max_retries=0)
    question = [{"role": "user", "content": "Who are you?"}]

    def ask(model: str) -> str:
        reply = client.chat.completions.create(
            model=model, messages=question, temperature=0, max_tokens=20
        )
        return reply.choices[0].message.content

    assert "Xinghe" in ask("xinghe")
    base = ask("smollm2-135m")
    model, tokenizer = smol_model
    (alone,) = generate(model, tokenizer, [question], SamplingParams(max_new_tokens=20))
    assert base == alone.text and "Xinghe" not in base
