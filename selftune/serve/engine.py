"""The server's decode loop: one worker thread owns the model and drains a queue of jobs.

Jobs that arrive together (each within `gather_s` of the last, up to `max_batch_size`) decode
together in one `generate()` call, one forward pass per step for all of them. Rows may use
different adapters (PEFT's per-row `adapter_names`), token limits and stop strings; they must
share the sampling rule, so the batch is split by it first. Results reach the asyncio side
through `loop.call_soon_threadsafe`, and a job whose consumer went away stops at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selftune.infer.generate import Completion, generate
from selftune.infer.sampling import SamplingParams

log = logging.getLogger(__name__)

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass
class ServedModel:
    """A model name of the API: the base model, or one adapter on it."""

    name: str
    adapter: str = BASE  # PEFT adapter name
    system: str | None = None  # used when a request has no system message
    parent: str | None = None  # the base model's name, for adapters
    checkpoint: Path | None = None


@dataclass
class Job:
    """One request's decode: token ids in, text pieces and then a Completion out."""

    prompt: list[int]
    params: SamplingParams
    adapter: str = BASE
    cancelled: bool = False  # set by the consumer; read by the worker at each step
    emit: Callable[[Any], None] = field(default=lambda event: None, repr=False)


def load_adapters(
    model: Any, checkpoints: dict[str, Path], parent: str
) -> tuple[Any, list[ServedModel]]:
    """Put every LoRA checkpoint on the base model under its own PEFT name (never merged), so one
    batch can mix them. The names PEFT sees are a0, a1, ...: API names may hold any character."""
    from peft import PeftModel

    from selftune.models.load import checkpoint_args

    served = []
    for i, (name, checkpoint) in enumerate(checkpoints.items()):
        adapter = f"a{i}"
        if i == 0:
            model = PeftModel.from_pretrained(model, checkpoint, adapter_name=adapter)
        else:
            model.load_adapter(checkpoint, adapter_name=adapter)
        system = checkpoint_args(checkpoint).get("system")
        served.append(ServedModel(name, adapter, system, parent, checkpoint))
    model.eval()
    return model, served


@contextmanager
def only_adapter(model: Any, adapter: str) -> Iterator[None]:
    """Decode under one adapter (or none) as the active one, in place of per-row names."""
    if adapter == BASE:
        with model.disable_adapter():
            yield
        return
    previous = model.active_adapter
    model.set_adapter(adapter)
    try:
        yield
    finally:
        model.set_adapter(previous)


def batch_key(params: SamplingParams) -> tuple:
    """Rows with the same key may decode together: generate() applies one sampling rule per
    batch. Seeded sampling decodes alone, so its answer does not depend on its neighbours."""
    if params.temperature <= 0:
        return ("greedy", params.repetition_penalty)
    if params.seed is not None:
        return ("seeded", id(params))
    return ("sampled", params.temperature, params.top_p, params.top_k, params.repetition_penalty)


def group_jobs(jobs: list[Job]) -> list[list[Job]]:
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(batch_key(job.params), []).append(job)
    return list(groups.values())


class Engine:
    """Owns the model: every forward pass happens on its worker thread."""

    def __init__(
        self, model: Any, tokenizer: Any, max_batch_size: int = 16, gather_s: float = 0.03
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max(1, max_batch_size)
        self.gather_s = gather_s
        self.uses_adapters = hasattr(model, "peft_config")
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self.work, name="selftune-engine", daemon=True)
        self.decodes = 0  # generate() calls so far; rows_decoded / decodes is the batching
        self.rows_decoded = 0
        self.active_rows = 0  # rows of the running decode not yet finished
        self.closing = False  # ends the running decode at its next step
        # held while a decode uses the model, adapter switches included: others wait on it
        self.model_lock = threading.Lock()

    def start(self) -> Engine:
        self.thread.start()
        return self

    def close(self) -> None:
        self.closing = True
        self.queue.put(None)
        self.thread.join(timeout=30)

    def work(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            jobs, last = self.gather(first)
            for group in group_jobs([job for job in jobs if not job.cancelled]):
                self.decode(group)
            if last:
                return

    def gather(self, first: Job) -> tuple[list[Job], bool]:
        """The first job and those arriving right behind it (each within gather_s), and whether
        close() was called meanwhile. A lone request waits gather_s once; the default is long
        enough that a wave of clients sent together lands in one batch on a busy CPU
        (bench/README.md)."""
        jobs = [first]
        while len(jobs) < self.max_batch_size:
            try:
                job = self.queue.get(timeout=self.gather_s)
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def decode(self, jobs: list[Job]) -> None:
        done: set[int] = set()

        def on_done(row: int, completion: Completion) -> None:
            done.add(row)
            self.active_rows -= 1
            jobs[row].emit(completion)

        forward_kwargs = None
        scope: Any = nullcontext()
        if self.uses_adapters and len(jobs) == 1:
            scope = only_adapter(self.model, jobs[0].adapter)  # lets one row decode on graphs
        elif self.uses_adapters:
            forward_kwargs = {"adapter_names": [job.adapter for job in jobs]}
        self.decodes += 1
        self.rows_decoded += len(jobs)
        self.active_rows = len(jobs)
        try:
            with self.model_lock, scope:
                self.run(jobs, forward_kwargs, on_done)
        except Exception as exc:  # one bad batch must not stop the server
            log.exception("decode of %d rows failed", len(jobs))
            for row, job in enumerate(jobs):
                if row not in done:
                    job.emit(exc)
        self.active_rows = 0

    def run(self, jobs: list[Job], forward_kwargs: Any, on_done: Callable) -> None:
        generate(
            self.model,
            self.tokenizer,
            [],
            jobs[0].params,
            on_text=lambda row, piece: jobs[row].emit(piece),
            should_stop=lambda row: jobs[row].cancelled or self.closing,
            forward_kwargs=forward_kwargs,
            prompts=[job.prompt for job in jobs],
            on_done=on_done,
            limits=[job.params.max_new_tokens for job in jobs],
            stops=[job.params.stop for job in jobs],
        )

    async def stream(self, job: Job) -> AsyncIterator[str | Completion]:
        """Queue the job and yield its text pieces, then its Completion. Leaving the loop early
        (a closed stream, a cancelled task) stops the job's row at the next decode step."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()

        def emit(event: Any) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed: nobody is listening
                job.cancelled = True

        job.emit = emit
        self.queue.put(job)
        finished = False
        try:
            while not finished:
                event = await events.get()
                if isinstance(event, BaseException):
                    finished = True
                    raise event
                finished = isinstance(event, Completion)
                yield event
        finally:
            if not finished:
                job.cancelled = True

    async def complete(self, job: Job) -> Completion:
        """The job's whole answer."""
        async with aclosing(self.stream(job)) as events:
            async for event in events:
                if isinstance(event, Completion):
                    return event
        raise RuntimeError("the engine ended a job without a completion")
