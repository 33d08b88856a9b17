"""Batch-1 decode on a preallocated KV cache, each token one CUDA graph replay on GPU.

Why: at batch 1 a decode step is hundreds of small kernels, and launching them from Python,
not reading the weights, bounds the plain loop far below what the memory bandwidth allows
(bench/README.md). With the cache preallocated and every shape fixed, a step is captured
once as a CUDA graph and replayed per token. The cache lives in buckets of doubling length, so a
short answer attends over a short cache; when an answer outgrows its bucket, the cache moves to
the next one. On the GPU each layer's attention of the step runs as two Triton launches
(accel.kernels.decode_attention), and the projections that share an input as one
(accel.kernels.stacked), both routed by accel.decode_routing.
On CPU the same steps run eagerly: the tests pin that they decode what the plain loop decodes.

Used by `generate()` for one row on CUDA, with no per-row adapter names (the server activates a
single request's adapter instead); anything unusual (sliding-window layers, quantised weights,
attention kernels without 4-D masks) keeps the plain loop.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from selftune.accel import decode_routing
from selftune.accel.kernels import decode_attention
from selftune.infer.sampling import check_finite_logits, pick_next

log = logging.getLogger(__name__)

FIRST_BUCKET = 256
LOOKAHEAD = 64  # tokens of answer the first bucket holds room for; longer answers grow it
MASKABLE_ATTENTION = ("sdpa", "eager")


@dataclass
class Bucket:
    """A cache of `length` positions and the fixed-address tensors its step reads and writes."""

    length: int
    cache: Any
    token: torch.Tensor  # (1, 1) the token being fed
    position: torch.Tensor  # (1, 1) its position; the step advances it
    arange: torch.Tensor  # (1, 1, 1, length)


@dataclass
class Step:
    """One decode step of a bucket under one adapter state; `graph` is None when eager."""

    graph: Any
    logits: torch.Tensor | None = None  # (1, vocab), the graph's output
    next_id: torch.Tensor | None = None  # (1,), its argmax


def unsupported_reason(model: Any) -> str | None:
    """Why the static path cannot decode this model, or None when it can."""
    config = model.config
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if attention not in MASKABLE_ATTENTION:
        return f"attention kernel {attention!r} takes no 4-D mask"
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return "quantised weights"
    if getattr(config, "quantization_config", None) is not None:
        return "quantised weights"
    for module in model.modules():
        kinds = getattr(module, "rope_type", None)
        kinds = kinds.values() if isinstance(kinds, dict) else [kinds]
        if any(k and ("dynamic" in k or "longrope" in k) for k in kinds):
            # these read the largest position on the CPU each step: no graph can hold that
            return "RoPE scaling that depends on the sequence length"
    try:
        from transformers import StaticCache
    except ImportError:
        return "this transformers has no StaticCache"
    try:  # allocates nothing: layers size themselves at their first update
        cache_layers(StaticCache(config=config, max_cache_len=16))
    except Exception:  # noqa: BLE001  # sliding-window layers, or a cache of another make
        return "sliding-window layers or a cache this path cannot drive"
    return None


def adapter_state(model: Any) -> tuple:
    """What decides which LoRA computation a forward runs; a captured graph is only valid for it."""
    for module in model.modules():
        if hasattr(module, "merged") and hasattr(module, "disable_adapters"):
            return (
                bool(module.disable_adapters),
                bool(module.merged),
                tuple(module.active_adapters),
            )
    return ()


def bucket_length(needed: int) -> int:
    length = FIRST_BUCKET
    while length < needed:
        length *= 2
    return length


def cache_layers(cache: Any) -> list[Any]:
    layers = list(getattr(cache, "layers", []))
    if not layers or not all(
        isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)
        and not getattr(layer, "is_sliding", False)
        for layer in layers
    ):
        raise RuntimeError("this transformers' StaticCache keeps no per-layer length tensor")
    return layers


def set_cache_length(cache: Any, length: int) -> None:
    for layer in cache_layers(cache):
        layer.cumulative_length.fill_(length)


class StaticDecoder:
    """Owns the buckets and captured steps of one model; kept on the model object."""

    def __init__(self, model: Any, use_graphs: bool, fast: bool | None = None):

        self.model = model
        # grouped LoRA and stacked projections: on the GPU, where launches bound the step
        self.fast = use_graphs if fast is None else fast
        self.stacks: list[Any] | None = None
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.use_graphs = use_graphs
        self.cache_keyword = cache_keyword(model)
        self.buckets: dict[int, Bucket] = {}
        self.steps: dict[tuple, Step] = {}
        self.pool = torch.cuda.graph_pool_handle() if use_graphs else None
        self.routing = -1  # lora_routing.ROUTINGS when the steps were captured
        self.lora_groups: list[Any] = []
        self.signatures: dict[tuple, int] = {}  # what captured steps read -> a short key
        self.slot = decode_attention.Slot()  # what the fused attention reads during a step
        self.fused_attention = 0  # attention modules routed through kernels.decode_attention

    def prepare(self) -> None:
        """Before an answer: route the LoRA layers through grouped LoRA (far fewer launches per
        token than PEFT's) and stack the projections that share an input (accel.kernels.stacked),
        drop graphs captured under another routing, and bring the adapters the graphs read
        up to date."""
        from selftune.accel import lora_routing as lora

        for stack in self.stacks or []:
            if not stack.released and not stack.intact():  # its weights moved (a safe merge,
                stack.release()  # `.to()`, FSDP): free the buffer, drop graphs over it
        if self.routing != lora.ROUTINGS[0]:
            groups = lora.lora_groups(self.model)
            if not groups and self.fast and hasattr(self.model, "peft_config"):
                lora.fuse_lora(self.model)
                groups = lora.lora_groups(self.model)
            if self.stacks is None:
                self.stacks = decode_routing.stack_projections(self.model) if self.fast else []
            self.stacks = [stack for stack in self.stacks if not stack.released]
            decode_routing.route_stacks(self.stacks)
            if self.fast and not self.fused_attention and decode_attention.runs_on(self.device):
                self.fused_attention = decode_routing.route_attention(self.model, self.slot)
            self.steps.clear()
            self.routing = lora.ROUTINGS[0]
            self.lora_groups = groups
        for group in self.lora_groups:
            group.refresh()
        for stack in self.stacks:
            stack.refresh()

    def state(self) -> tuple:
        """The key of a captured step besides its bucket: the adapter state, and what the
        graph reads through grouped LoRA and the stacks (a re-added adapter of another rank
        lands in new buffers; the old graph must not replay over them)."""
        routed = tuple(g.signature() for g in self.lora_groups)
        routed += tuple(s.signature() for s in self.stacks or [])
        # a small number per distinct signature: the key is hashed twice per token
        return adapter_state(self.model), self.signatures.setdefault(routed, len(self.signatures))

    def bucket(self, length: int) -> Bucket:
        if length not in self.buckets:
            from transformers import StaticCache

            long_ = {"dtype": torch.long, "device": self.device}
            self.buckets[length] = Bucket(
                length,
                StaticCache(config=self.model.config, max_cache_len=length),
                torch.zeros((1, 1), **long_),
                torch.zeros((1, 1), **long_),
                torch.arange(length, **long_).view(1, 1, 1, length),
            )
        return self.buckets[length]

    def mask(self, visible: torch.Tensor) -> torch.Tensor:
        """Additive mask (0 where visible): read alike by the SDPA and eager attention kernels."""
        blocked = torch.finfo(self.dtype).min
        return torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill(
            ~visible, blocked
        )

    def on_device(self) -> Any:
        """The model's GPU as the current one: Triton kernels (Liger's) and graph capture launch
        on the current device, which for a model on cuda:1 is not its own."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()

    def forward(self, bucket: Bucket, ids, positions, mask) -> torch.Tensor:
        with self.on_device():
            out = self.model(
                input_ids=ids,
                position_ids=positions,
                attention_mask=mask,
                use_cache=True,
                logits_to_keep=1,
                **{self.cache_keyword: bucket.cache},
            )
        return out.logits[:, -1, :]

    def prefill(self, bucket: Bucket, prompt: list[int]) -> torch.Tensor:
        """Run the prompt into an emptied cache; return the last position's logits."""
        n = len(prompt)
        set_cache_length(bucket.cache, 0)
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        positions = torch.arange(n, device=self.device)[None]
        visible = bucket.arange.view(1, -1) <= positions.view(-1, 1)
        logits = self.forward(bucket, ids, positions, self.mask(visible)[None, None])
        set_cache_length(bucket.cache, n)
        bucket.position.fill_(n)
        return logits

    def run_step(self, bucket: Bucket) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed `bucket.token` at `bucket.position`, advance the position; fixed shapes only."""
        visible = bucket.arange <= bucket.position.view(1, 1, 1, 1)
        self.slot.cache, self.slot.position = bucket.cache, bucket.position
        try:
            logits = self.forward(bucket, bucket.token, bucket.position, self.mask(visible))
        finally:
            self.slot.cache = self.slot.position = None
        bucket.position.add_(1)
        return logits, logits.argmax(-1)

    def step(self, bucket: Bucket, state: tuple) -> Step:
        """The bucket's step under adapter `state`, captured on first use."""
        key = (bucket.length, state)
        if key in self.steps:
            return self.steps[key]
        if not self.use_graphs:
            self.steps[key] = Step(None)
            return self.steps[key]
        at = int(bucket.position.item())
        try:
            with self.on_device():  # capture records on the current device's stream
                self.steps[key] = self.capture(bucket)
            log.info("decode: captured a CUDA graph for a %d-token cache", bucket.length)
        except Exception as exc:  # noqa: BLE001  # this bucket decodes eagerly instead
            log.warning("decode: no CUDA graph for a %d-token cache (%s)", bucket.length, exc)
            self.steps[key] = Step(None)
        # the warm-up wrote at `at` and `at + 1`; the real steps overwrite both before they show
        bucket.position.fill_(at)
        set_cache_length(bucket.cache, at)
        return self.steps[key]

    def capture(self, bucket: Bucket) -> Step:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: lazy inits and kernel choices happen outside capture
                self.run_step(bucket)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits, next_id = self.run_step(bucket)
        return Step(graph, logits, next_id)

    def replay(self, bucket: Bucket, state: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.step(bucket, state)
        if step.graph is None:
            return self.run_step(bucket)
        with self.on_device():
            step.graph.replay()
        return step.logits, step.next_id

    def grow(self, bucket: Bucket, needed: int) -> Bucket:
        """Move the cache into the next bucket that holds `needed` positions."""
        bigger = self.bucket(bucket_length(needed))
        at = int(bucket.position.item())
        if not all(getattr(layer, "is_initialized", False) for layer in bigger.cache.layers):
            # a first forward initialises the new cache's tensors; the copy below replaces them
            self.prefill(bigger, [0])
        for old, new in zip(cache_layers(bucket.cache), cache_layers(bigger.cache)):
            new.keys[:, :, :at].copy_(old.keys[:, :, :at])
            new.values[:, :, :at].copy_(old.values[:, :, :at])
        set_cache_length(bigger.cache, at)
        bigger.position.fill_(at)
        return bigger


def decoder_for(model: Any) -> StaticDecoder:
    decoder = getattr(model, "_selftune_static_decoder", None)
    if decoder is not None and decoder.model is not model:  # PEFT passes attributes through:
        decoder.buckets.clear()  # the wrapped model's decoder; free its caches and graphs
        decoder.steps.clear()
        decoder = None
    if decoder is None:
        on_gpu = next(model.parameters()).is_cuda
        if on_gpu:
            from selftune.accel.liger import apply_liger

            inner = model.get_base_model() if hasattr(model, "get_base_model") else model
            if apply_liger(inner):  # fewer kernels per token (bench/README.md)
                log.info("decode: Liger RMSNorm/RoPE/SwiGLU kernels")
        decoder = StaticDecoder(model, use_graphs=on_gpu)
        model._selftune_static_decoder = decoder
    return decoder


def disable(model: Any) -> None:
    """Keep this model on the plain loop from now on (with its modules' own forwards)."""
    decoder = getattr(model, "_selftune_static_decoder", None)
    if isinstance(decoder, StaticDecoder):
        decode_routing.unroute_attention(model)
        for stack in decoder.stacks or []:
            if not stack.released:
                stack.release()
    model._selftune_static_decoder = False


def wanted(model: Any, rows: int, forward_kwargs: dict[str, Any] | None) -> bool:
    """generate() takes the static path for one row on CUDA when the model allows it."""
    if rows != 1 or forward_kwargs or not next(model.parameters()).is_cuda:
        return False
    decoder = getattr(model, "_selftune_static_decoder", None)
    if decoder is not None:  # checked at its first answer: False, or a decoder
        return decoder is not False
    reason = unsupported_reason(model)
    if reason is not None:
        log.info("decode: plain loop (%s)", reason)
        disable(model)
        return False
    return True


@torch.inference_mode()
def static_steps(
    model: Any, prompt: list[int], params: Any, end_ids: set[int], generator: Any = None
) -> Iterator[int]:
    """Yield the answer's token ids one by one, as `decode_steps` does for a single row.

    Each token's step is made ready (its bucket grown, its graph captured) before the token is
    yielded, so a failure there surfaces before the first token and the caller can fall back."""

    if params.max_new_tokens <= 0:
        return
    decoder = decoder_for(model)
    decoder.prepare()
    state = decoder.state()  # adapters do not change within one answer
    bucket = decoder.bucket(bucket_length(len(prompt) + min(params.max_new_tokens, LOOKAHEAD) + 2))
    logits = decoder.prefill(bucket, prompt)
    greedy = params.temperature <= 0 and params.repetition_penalty == 1.0
    seen = torch.tensor([prompt], dtype=torch.long, device=decoder.device)
    token = pick_next(logits, seen, params, generator)
    produced = 0
    while True:
        token_id = int(token.item())
        produced += 1
        done = token_id in end_ids or produced >= params.max_new_tokens
        if not done:
            at = len(prompt) + produced - 1  # where this token's key and value go
            if at + 2 > bucket.length:  # a step (and a capture's warm-up) writes at and at + 1
                left = params.max_new_tokens - produced
                bucket = decoder.grow(bucket, at + min(left, 1024) + 2)
            bucket.token.copy_(token.view(1, 1))
            decoder.step(bucket, state)
        yield token_id
        if done:
            return
        logits, next_id = decoder.replay(bucket, state)
        if greedy:
            check_finite_logits(logits)
            token = next_id
        else:
            seen = torch.cat([seen, token.view(1, 1)], dim=1)
            token = pick_next(logits, seen, params, generator)


def cache_keyword(model: Any) -> str:
    """transformers 5.2x renamed `past_key_values` to `cache`; accept both versions."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
