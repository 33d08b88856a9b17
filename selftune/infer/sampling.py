"""Sampling settings and the next-token choice: greedy, temperature, top-k, top-p and the
repetition penalty."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from selftune.args import GenerationArgs
from selftune.errors import SelftuneError


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 512
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


def sampling_from_args(args: GenerationArgs, generation_config: Any = None) -> SamplingParams:
    """Flags win; otherwise the model's generation_config; otherwise greedy."""
    config_sampling = bool(getattr(generation_config, "do_sample", False))

    def pick(name: str, default: Any) -> Any:
        value = getattr(args, name)
        if value is not None:
            return value
        if config_sampling and getattr(generation_config, name, None) is not None:
            return getattr(generation_config, name)
        return default

    return SamplingParams(
        temperature=pick("temperature", 0.0),
        top_p=pick("top_p", 1.0),
        top_k=pick("top_k", 0),
        repetition_penalty=pick("repetition_penalty", 1.0),
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )


def check_finite_logits(logits: torch.Tensor) -> None:
    """Raise unless every row's logits are finite: a NaN or inf anywhere in a row makes its
    maximum non-finite, so one small reduction tells."""
    if not bool(torch.isfinite(logits.amax(dim=-1)).all()):
        raise SelftuneError(
            "the model gave non-finite logits (NaN or inf): its weights are broken, as after a "
            "fine-tune that diverged; nothing was generated from them"
        )


def pick_next(
    logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams, generator: Any
) -> torch.Tensor:
    """Next token per row from last-position logits (rows x vocab). Logits that are not finite
    (NaN or inf, a diverged fine-tune) stop the generation with an error, where picking from
    them would print empty or garbled text as if all were well."""
    logits = logits.float()
    check_finite_logits(logits)
    if params.repetition_penalty != 1.0:
        picked = logits.gather(1, seen)
        picked = torch.where(
            picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty
        )
        logits = logits.scatter(1, seen, picked)
    if params.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k and params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)
