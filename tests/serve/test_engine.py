"""The engine on a tiny random Llama with two random LoRA adapters: rows that arrive together
decode in one batch, each with its own adapter, limit and stop strings, exactly as alone."""

from __future__ import annotations

import asyncio
import threading

import pytest
from support import make_adapter_checkpoint

from selftune.infer.generate import Completion, generate, render_prompt
from selftune.infer.sampling import SamplingParams
from selftune.serve.engine import BASE, Engine, Job, group_jobs, load_adapters

QUESTION = [{"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    from selftune.models.load import load_model

    root = tmp_path_factory.mktemp("adapters")
    checkpoints = {
        name: make_adapter_checkpoint(tiny_model_dir, root / name, seed=seed)
        for name, seed in (("one", 1), ("two", 2))
    }
    model, tokenizer, _ = load_model(str(tiny_model_dir), device="cpu")
    model, served = load_adapters(model, checkpoints, parent="tiny")
    engine = Engine(model, tokenizer, max_batch_size=8, gather_s=0.05).start()
    engine.served = {each.name: each for each in served}
    yield engine
    engine.close()


def prompt_of(engine, messages=QUESTION) -> list[int]:
    return render_prompt(engine.tokenizer, messages)


def decode_alone(engine, adapter: str, prompt: list[int], params: SamplingParams) -> Completion:
    """Plain PEFT decoding, no engine and no per-row adapter names: the reference. It waits
    for the engine's worker to let go of the model (a finished row's answer can arrive before
    the worker has restored the adapters)."""
    model = engine.model
    with engine.model_lock:
        if adapter == BASE:
            with model.disable_adapter():
                return generate(model, engine.tokenizer, [], params, prompts=[prompt])[0]
        model.set_adapter(adapter)
        return generate(model, engine.tokenizer, [], params, prompts=[prompt])[0]


async def complete_together(engine, jobs: list[Job]) -> list[Completion]:
    return list(await asyncio.gather(*(engine.complete(job) for job in jobs)))


def test_adapters_load_with_their_training_system_prompt(engine):
    from support import TINY_SYSTEM

    assert engine.served["one"].system == TINY_SYSTEM
    assert engine.served["one"].adapter != engine.served["two"].adapter


def test_rows_with_different_adapters_decode_together_as_alone(engine):
    params = SamplingParams(max_new_tokens=8)
    other = [{"role": "user", "content": "Name a colour, please."}]
    rows = [
        (BASE, prompt_of(engine)),
        ("one", prompt_of(engine)),
        ("two", prompt_of(engine)),
        ("one", prompt_of(engine, other)),
    ]
    names = [name if name == BASE else engine.served[name].adapter for name, _ in rows]
    alone = [
        decode_alone(engine, name, prompt, params).text for name, (_, prompt) in zip(names, rows)
    ]
    assert len(set(alone[:3])) == 3, (
        "the adapters must change the answer for this test to mean much"
    )

    decodes_before = engine.decodes
    jobs = [Job(prompt, params, name) for name, (_, prompt) in zip(names, rows)]
    together = asyncio.run(complete_together(engine, jobs))
    assert [c.text for c in together] == alone
    assert engine.decodes == decodes_before + 1  # one decode for all four rows


def test_each_row_keeps_its_own_limit_and_stop_strings(engine):
    adapter = engine.served["two"].adapter
    prompt = prompt_of(engine)
    full = decode_alone(engine, adapter, prompt, SamplingParams(max_new_tokens=12))
    assert full.completion_tokens == 12, "the reference answer must run to its limit"
    stop = full.text[len(full.text) // 2 :][:2]
    assert full.text.find(stop) > 0, "the stop string should cut the answer after its start"
    jobs = [
        Job(prompt, SamplingParams(max_new_tokens=3), adapter),
        Job(prompt, SamplingParams(max_new_tokens=6), adapter),
        Job(prompt, SamplingParams(max_new_tokens=12, stop=[stop]), adapter),
    ]
    short, longer, stopped = asyncio.run(complete_together(engine, jobs))
    assert (short.completion_tokens, short.finish_reason) == (3, "length")
    assert (longer.completion_tokens, longer.finish_reason) == (6, "length")
    assert full.text.startswith(short.text) and full.text.startswith(longer.text)
    assert len(short.text) < len(longer.text)
    assert stopped.text == full.text[: full.text.find(stop)]
    assert stopped.finish_reason == "stop" and stop not in stopped.text


def test_streamed_pieces_add_up_to_the_answer(engine):
    async def collect() -> tuple[str, Completion]:
        pieces, done = [], None
        job = Job(
            prompt_of(engine), SamplingParams(max_new_tokens=10), engine.served["two"].adapter
        )
        async for event in engine.stream(job):
            if isinstance(event, Completion):
                done = event
            else:
                pieces.append(event)
        return "".join(pieces), done

    text, done = asyncio.run(collect())
    assert done is not None and text == done.text and len(text) > 0


def test_a_cancelled_job_stops_early(engine):
    limit = 200
    prompt = prompt_of(engine)
    whole = decode_alone(engine, BASE, prompt, SamplingParams(max_new_tokens=limit))
    assert whole.completion_tokens == limit, "the reference answer must run to its limit"

    first_piece, finished = threading.Event(), threading.Event()
    result: list[Completion] = []
    job = Job(prompt, SamplingParams(max_new_tokens=limit))

    def emit(event) -> None:
        if isinstance(event, Completion):
            result.append(event)
            finished.set()
        else:
            first_piece.set()

    job.emit = emit
    engine.queue.put(job)
    assert first_piece.wait(60)
    job.cancelled = True  # what a closed stream does
    assert finished.wait(60)
    assert result[0].completion_tokens < limit // 2


def test_closing_a_stream_cancels_its_job(engine):
    job = Job(prompt_of(engine), SamplingParams(max_new_tokens=200))

    async def read_one_piece() -> None:
        events = engine.stream(job)
        await anext(events)
        await events.aclose()

    asyncio.run(read_one_piece())
    assert job.cancelled


def test_rows_share_a_batch_only_when_they_sample_alike():
    def job(**params) -> Job:
        return Job([1], SamplingParams(**params))

    greedy = [job(temperature=0.0, seed=1), job(temperature=0.0, top_p=0.5)]
    warm = [job(temperature=0.7), job(temperature=0.7)]
    hot = job(temperature=1.0)
    seeded = [job(temperature=0.7, seed=3), job(temperature=0.7, seed=3)]
    groups = group_jobs([*greedy, *warm, hot, *seeded])
    assert [len(g) for g in groups] == [2, 2, 1, 1, 1]
    assert groups[0] == greedy and groups[1] == warm


def test_a_lone_row_decodes_under_its_own_adapter(engine):
    """One request decodes with its adapter made the active one (no per-row names, so the GPU
    can replay graphs), whichever adapter was active before."""
    params = SamplingParams(max_new_tokens=8)
    prompt = prompt_of(engine)
    adapters = [BASE, engine.served["two"].adapter, engine.served["one"].adapter]
    expected = [decode_alone(engine, adapter, prompt, params).text for adapter in adapters]
    assert len(set(expected)) == 3
    with engine.model_lock:
        engine.model.set_adapter(engine.served["one"].adapter)
    for adapter, answer in zip(adapters, expected):
        (got,) = asyncio.run(complete_together(engine, [Job(prompt, params, adapter)]))
        assert got.text == answer, adapter
