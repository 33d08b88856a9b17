"""The one generation engine: chat, batch inference, eval and the server all decode here.

A plain batched decode loop over the model's KV cache: left-padded prompts, greedy or sampled
next tokens, stop on the model's end tokens or on stop strings, text streamed per step. One row
on CUDA decodes on a static cache with CUDA graphs instead (infer.static_decode).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from selftune.errors import SelftuneError
from selftune.infer import static_decode
from selftune.infer.sampling import SamplingParams, pick_next
from selftune.infer.static_decode import cache_keyword

# End-of-turn tokens of common chat templates; used when the vocabulary has them.
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>", "<end_of_turn>", "</s>")

Messages = list[dict[str, str]]
log = logging.getLogger(__name__)


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    seconds: float = 0.0


def stop_token_ids(tokenizer: Any, model: Any = None) -> set[int]:
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in eos if isinstance(eos, list) else [eos]:
        if value is not None:
            ids.add(int(value))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_TOKENS if token in vocab)
    return ids


def render_prompt(tokenizer: Any, messages: Messages) -> list[int]:
    """Token ids of a conversation, ending where the assistant's answer starts."""
    if tokenizer.chat_template is None:
        text = "\n".join(m["content"] for m in messages) + "\n"
        return tokenizer(text, add_special_tokens=True)["input_ids"]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # some versions return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def context_length(model: Any) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 1 << 20)


class TextStream:
    """Incremental detokenisation: emits whole characters only, and holds back a tail that could
    still grow into a stop string."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False
        self.final: str | None = None

    def held_tail(self, text: str) -> int:
        for k in range(max((len(s) for s in self.stop), default=1) - 1, 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stop if len(s) > k):
                return k
        return 0

    def emit(self, text: str, upto: int) -> str:
        piece = text[self.emitted : upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return piece

    def push(self, token_id: int) -> str:
        """Add a token and return the text that is now safe to show."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [at for at in (text.find(s) for s in self.stop) if at != -1]
        if hits:
            self.stopped = True
            self.final = text[: min(hits)]
            return self.emit(self.final, len(self.final))
        if text.endswith("\ufffd"):
            return ""
        return self.emit(text, len(text) - self.held_tail(text))

    def finish(self) -> str:
        """Return the rest of the text once decoding ends."""
        if self.final is None:
            self.final = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self.emit(self.final, len(self.final))


@torch.inference_mode()
def decode_steps(
    model: Any,
    prompts: list[list[int]],
    params: SamplingParams,
    end_ids: set[int],
    pad_id: int,
    forward_kwargs: dict[str, Any] | None = None,
) -> Iterator[list[int | None]]:
    """Yield, per step, each row's new token id (None once the row has finished)."""
    from transformers import DynamicCache

    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    if static_decode.wanted(model, len(prompts), forward_kwargs):
        steps = static_decode.static_steps(model, prompts[0], params, end_ids, generator)
        try:
            first = next(steps)
        except Exception as exc:  # noqa: BLE001  # any failure to set up: the plain loop decodes
            log.warning("decode: static cache path failed (%s); using the plain loop", exc)
            static_decode.disable(model)
            if params.seed is not None:  # the same draws as if the plain loop had run alone
                generator = torch.Generator().manual_seed(params.seed)
        else:
            yield [first]
            for token in steps:
                yield [token]
            return
    device = next(model.parameters()).device
    rows = len(prompts)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt) :] = torch.tensor(prompt)
        attention[i, width - len(prompt) :] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    seen = input_ids.clone()
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    cache = DynamicCache()
    step_input = input_ids
    extra = {**(forward_kwargs or {}), cache_keyword(model): cache}
    for _ in range(params.max_new_tokens):
        positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, -step_input.shape[1] :]
        out = model(
            input_ids=step_input,
            attention_mask=attention,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
        next_ids = pick_next(out.logits[:, -1, :], seen, params, generator)
        next_ids = torch.where(finished, torch.full_like(next_ids, pad_id), next_ids)
        ids = next_ids.tolist()
        is_end = torch.tensor([t in end_ids for t in ids], device=device)
        yield [None if done else t for t, done in zip(ids, finished.tolist())]
        finished |= is_end
        if bool(finished.all()):
            return
        step_input = next_ids[:, None]
        seen = torch.cat([seen, step_input], dim=1)
        attention = torch.cat([attention, (~finished).long()[:, None]], dim=1)


def generate(
    model: Any,
    tokenizer: Any,
    conversations: list[Messages],
    params: SamplingParams,
    on_text: Callable[[int, str], None] | None = None,
    should_stop: Callable[[int], bool] | None = None,
    forward_kwargs: dict[str, Any] | None = None,
    prompts: list[list[int]] | None = None,
    on_done: Callable[[int, Completion], None] | None = None,
    limits: list[int] | None = None,
    stops: list[list[str]] | None = None,
) -> list[Completion]:
    """Answer each conversation; `on_text(row, piece)` receives streamed text as it is decoded.

    `on_done(row, completion)` is called as soon as a row ends, before the rest of the batch.
    `prompts`, when given, are token ids decoded as they are, in place of rendering
    `conversations` (the server renders once to check lengths, and takes raw-text prompts).
    `limits` and `stops` are each row's own token limit and stop strings, in place of
    `params.max_new_tokens` and `params.stop` (the server batches requests that differ in them)."""
    start = time.perf_counter()
    if prompts is None:
        prompts = [render_prompt(tokenizer, messages) for messages in conversations]
    limit = context_length(model)
    for prompt in prompts:
        if len(prompt) >= limit:
            raise SelftuneError(
                f"prompt of {len(prompt)} tokens does not fit the model's context of {limit}"
            )
    limits = limits or [params.max_new_tokens] * len(prompts)
    budget = min(max(limits), limit - max(len(p) for p in prompts))
    step_params = SamplingParams(**{**params.__dict__, "max_new_tokens": budget})
    end_ids = stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(end_ids)
    stops = stops or [params.stop] * len(prompts)
    streams = [TextStream(tokenizer, row_stop) for row_stop in stops]
    counts = [0] * len(prompts)
    completions: list[Completion | None] = [None] * len(prompts)

    def close(row: int, reason: str) -> None:
        tail = streams[row].finish()
        if tail and on_text:
            on_text(row, tail)
        done = Completion(
            streams[row].final, len(prompts[row]), counts[row], reason, time.perf_counter() - start
        )
        completions[row] = done
        if on_done:
            on_done(row, done)

    for step_ids in decode_steps(model, prompts, step_params, end_ids, pad_id, forward_kwargs):
        for row, token in enumerate(step_ids):
            if token is None or completions[row] is not None:
                continue
            if (should_stop is not None and should_stop(row)) or token in end_ids:
                close(row, "stop")
                continue
            counts[row] += 1
            piece = streams[row].push(token)
            if piece and on_text:
                on_text(row, piece)
            if streams[row].stopped:
                close(row, "stop")
            elif counts[row] >= limits[row]:
                close(row, "length")
        if all(done is not None for done in completions):
            break
    for row, done in enumerate(completions):
        if done is None:
            close(row, "length")
    return completions  # type: ignore[return-value]  # every row is closed above
