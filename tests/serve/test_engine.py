"""The engine alone, on the tiny model: batching, adapters per row, per-row limits, cancelling."""

from __future__ import annotations

import asyncio

import pytest

from selftune.errors import SelftuneError
from selftune.generate import SamplingParams
from selftune.serve.engine import Request, batch_key, parse_adapter_spec


async def outcome(job: Request) -> tuple[str, object, str]:
    """(last event kind, its value, streamed text) of a job."""
    text = ""
    while True:
        kind, value = await job.events.get()
        if kind != "text":
            return kind, value, text
        text += value


async def submit_together(engine, requests):
    """Queue every request while the engine holds still, so that they form one batch."""
    engine.pause()
    try:
        jobs = [
            engine.submit(name, engine.encode_chat(name, messages), SamplingParams(**params))
            for name, messages, params in requests
        ]
    finally:
        engine.resume()
    return await asyncio.gather(*(outcome(job) for job in jobs)), jobs


def test_one_batch_of_three_models_matches_each_model_alone(
    tiny_server, tiny_requests, tiny_references
):
    engine = tiny_server.engine
    requests = [(n, m, {"max_new_tokens": k}) for n, m, k in tiny_requests]
    results, jobs = asyncio.run(submit_together(engine, requests))
    assert engine.batches[-1] == [name for name, _, _ in requests]  # one decode, three models
    assert [text for _, _, text in results] == tiny_references
    assert [done.text for _, done, _ in results] == tiny_references
    # The adapters matter: the same question gets three different answers.
    assert len({tiny_references[0], tiny_references[1], tiny_references[2]}) == 3
    for (_, _, max_tokens), (kind, done, _), job in zip(tiny_requests, results, jobs):
        assert kind == "done"
        assert done.completion_tokens <= max_tokens
        if done.finish_reason == "length":
            assert done.completion_tokens == max_tokens
        record = engine.wait_finished(job.id)
        assert record.batch_size == 16 and record.completion_tokens == done.completion_tokens


def test_rows_end_at_their_own_max_tokens(tiny_server):
    engine = tiny_server.engine
    question = [{"role": "user", "content": "Tell me a story."}]
    requests = [("tiny", question, {"max_new_tokens": k}) for k in (2, 9)]
    (short, long_), _ = asyncio.run(submit_together(engine, requests))
    assert short[1].completion_tokens == 2 and short[1].finish_reason == "length"
    assert long_[1].completion_tokens == 9 and long_[1].finish_reason == "length"
    assert long_[1].text.startswith(short[1].text)


def test_request_cancelled_in_the_queue_is_never_decoded(tiny_server):
    engine = tiny_server.engine

    async def scenario():
        engine.pause()
        try:
            ids = engine.encode_chat("tiny", [{"role": "user", "content": "Hi"}])
            job = engine.submit("tiny", ids, SamplingParams(max_new_tokens=5))
            job.cancel()
        finally:
            engine.resume()
        return job, await outcome(job)

    job, (kind, _, text) = asyncio.run(scenario())
    assert kind == "cancelled" and text == ""
    record = engine.wait_finished(job.id)
    assert record.finish_reason == "cancelled" and record.completion_tokens == 0


def test_adapter_default_system_prompt_is_prepended_only_when_absent(tiny_server):
    engine = tiny_server.engine
    question = [{"role": "user", "content": "Hi"}]
    own = [{"role": "system", "content": "Be terse."}, *question]
    tokenizer = engine.prompt_tokenizer
    assert "You are Alpha." in tokenizer.decode(engine.encode_chat("alpha", question))
    assert "You are Alpha." not in tokenizer.decode(engine.encode_chat("alpha", own))
    assert "You are Alpha." not in tokenizer.decode(engine.encode_chat("beta", question))


def make_request(rid: str, **params) -> Request:
    return Request(rid, None, [1], SamplingParams(**params), loop=None)


def test_batch_key_groups_only_requests_that_can_share_a_decode():
    greedy = batch_key(make_request("a", seed=1, top_p=0.5))
    assert greedy == batch_key(make_request("b", seed=2))  # greedy ignores seed and top_p
    assert greedy != batch_key(make_request("c", stop=["\n"]))
    sampled = batch_key(make_request("d", temperature=0.7))
    assert sampled == batch_key(make_request("e", temperature=0.7))
    assert sampled != batch_key(make_request("f", temperature=0.9))
    # A seeded sampled request decodes alone: its answer must not depend on its neighbours.
    assert batch_key(make_request("g", temperature=0.7, seed=3)) != batch_key(
        make_request("h", temperature=0.7, seed=3)
    )


def test_adapter_specs(tmp_path, tiny_adapters, tiny_model_dir):
    assert parse_adapter_spec(f"me={tiny_adapters['alpha']}") == ("me", tiny_adapters["alpha"])
    assert parse_adapter_spec(str(tiny_adapters["beta"])) == ("beta", tiny_adapters["beta"])
    with pytest.raises(SelftuneError, match="no adapter_config.json"):
        parse_adapter_spec(f"x={tmp_path}")
    with pytest.raises(SelftuneError, match="full model"):
        parse_adapter_spec(f"x={tiny_model_dir}")
