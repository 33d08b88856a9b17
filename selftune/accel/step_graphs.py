"""Training micro-batches replayed as CUDA graphs: short packs are bound by host time.

A forward and backward through grouped LoRA costs about the same host time whatever a short
pack's length: launching the kernels, not running them, sets the pace, so short packs leave the
GPU idle most of each step (bench/README.md). Here a micro-batch whose shapes recur is
captured, on its second sighting, as one CUDA graph of its forward, loss and backward. Each
later one copies its tensors into the graph's inputs and replays it: one launch.

What makes a replay right:
- the gradients accumulate in place into each trainable parameter's `.grad`, so those must stay
  the same tensors: the loop zeroes them (`zero_grad(set_to_none=False)`); a replay checks the
  addresses and drops every graph when they moved;
- the graph reads the float32 adapters and casts them itself (lora_routing recasts while
  capturing), so it sees each optimizer step; dropout draws new masks at each replay (PyTorch's
  graph-safe RNG);
- checkpointed layers replay too: their recompute draws the forward's masks again (PyTorch
  restores the graph-safe RNG state);
- label positions come with the batch (`label_index`), so the loss needs no boolean mask and
  nothing waits for the GPU; the capture fixes every shape and every non-tensor value (the
  longest conversation, for the varlen kernel), which is the key a batch is matched on.

A batch seen once runs eagerly, as do replay rows (their loss splits on a mask) and passes of
more than MAX_TOKENS tokens. When a capture fails, graphs are off for the run and the batch runs
eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from selftune.data.batches import HOST_ONLY, TEACHER_KEYS, with_label_index

log = logging.getLogger(__name__)
MAX_GRAPHS = 8  # distinct shapes captured; each holds its activations in one shared pool
# padding of a pack, so that packs of similar size share a graph: tokens, conversations,
# label positions and the longest conversation round up to these multiples
TOKEN_STEP, SEGMENT_STEP, LABEL_STEP, LENGTH_STEP = 256, 4, 256, 64
PAD_BELOW = 4096  # tokens: longer packs keep their shape (padding would cost more than it saves)
# tokens: longer passes run eagerly; passes up to this size replay faster than they run eagerly,
# at about the same peak memory (bench/README.md)
MAX_TOKENS = 8192


def round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def padded_tokens(tokens: int) -> int:
    """The most tokens a pack of `tokens` has after pad_pack."""
    return tokens if tokens >= PAD_BELOW else round_up(tokens + SEGMENT_STEP + 1, TOKEN_STEP)


def planned_tokens(largest: int) -> tuple[int, int]:
    """(tokens of the largest pass, tokens of the largest graph held beside it) for memory
    planning, packs of up to `largest` tokens given."""
    biggest = padded_tokens(largest)
    return biggest, min(biggest, MAX_TOKENS)


def pad_pack(batch: dict[str, Any]) -> dict[str, Any]:
    """A packed batch (one row, `cu_seq_lens_q`, `label_index`), on the host, padded to the
    next size of each kind: padding tokens form conversations of their own with no labels, and
    the padded label positions read a padding token whose label is -100, which the loss leaves
    out. Other batches, and packs of PAD_BELOW tokens or more, come back as they are."""
    cu = batch.get("cu_seq_lens_q")
    if cu is None or "label_index" not in batch or batch["input_ids"].shape[0] != 1:
        return batch
    if batch["input_ids"].shape[1] >= PAD_BELOW:
        return batch
    if any(k in batch for k in TEACHER_KEYS):  # replay rows never replay: padding only costs
        return batch
    tokens, segments = batch["input_ids"].shape[1], len(cu) - 1
    pad_segments = round_up(segments + 1, SEGMENT_STEP) - segments
    # one token more than conversations, so the last one has two: see the label padding
    padded = round_up(tokens + pad_segments + 1, TOKEN_STEP)
    pad = padded - tokens
    lengths = [1] * (pad_segments - 1) + [pad - pad_segments + 1]
    ends = tokens + torch.tensor(lengths).cumsum(0)
    cu_padded = torch.cat([cu, ends.to(cu.dtype)])
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    index = batch["label_index"]
    extra = round_up(len(index), LABEL_STEP) - len(index)
    longest = round_up(max(int(batch["max_length_q"]), lengths[-1]), LENGTH_STEP)

    def extend(tensor: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor, values.to(tensor.dtype)[None]], dim=1)

    return {
        **batch,
        "input_ids": extend(batch["input_ids"], torch.zeros(pad)),
        "labels": extend(batch["labels"], torch.full((pad,), -100)),
        "position_ids": extend(batch["position_ids"], positions[0]),
        "cu_seq_lens_q": cu_padded,
        "cu_seq_lens_k": cu_padded,
        "max_length_q": longest,
        "max_length_k": longest,
        # the last padding conversation's first token: its next token is padding too
        "label_index": torch.cat(
            [index, torch.full((extra,), padded - lengths[-1], dtype=index.dtype)]
        ),
        "label_tokens": batch.get("label_tokens", len(index)),
        "pad_tokens": pad,
    }


def eager_pass(loss_fn: Callable, batch: dict[str, Any], factor: float) -> tuple[torch.Tensor, Any]:
    """loss_fn(batch) and the backward of its loss sum times `factor`; (loss sum, correct). The
    loss comes back detached: no autograd graph outlives its pass (see StepGraphs.capture)."""
    loss_sum, _, correct = loss_fn(batch)
    (loss_sum * factor).backward()
    return loss_sum.detach(), correct


@dataclass
class Captured:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # the graph's own copies of the batch's tensors
    factor: torch.Tensor  # the loss's weight in the step (a 0-dim float32 tensor)
    loss: torch.Tensor
    correct: torch.Tensor
    grads: list[int]  # the `.grad` addresses the backward accumulates into


def batch_key(batch: dict[str, Any], training: bool) -> tuple | None:
    """What a capture fixes: each tensor's shape and dtype and every other value; None for a
    batch that cannot be captured."""
    # replay rows run eagerly: their packs are not padded to shared shapes, and their capture is
    # untried on a GPU
    if "label_index" not in batch or any(k in batch for k in TEACHER_KEYS):
        return None
    parts = []
    for name in sorted(set(batch) - set(HOST_ONLY)):
        value = batch[name]
        if isinstance(value, torch.Tensor):
            parts.append((name, tuple(value.shape), value.dtype, value.device.type))
        else:
            parts.append((name, value))
    return (training, *parts)


class StepGraphs:
    """Forward + backward per micro-batch, eager or replayed. `loss_fn(batch)` gives (loss sum,
    count, correct) as train.loss.batch_loss does; `model` is what it trains (for train/eval
    mode and the LoRA routing); `params` the trainable parameters."""

    def __init__(
        self,
        loss_fn: Callable,
        model: Any,
        params: list[torch.Tensor],
        max_graphs: int = MAX_GRAPHS,
    ):
        from selftune.accel.lora_routing import ROUTINGS

        self.loss_fn = loss_fn
        self.model = model
        self.params = params
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, Captured] = {}
        self.seen: set[tuple] = set()
        self.pool = torch.cuda.graph_pool_handle()
        self.side = torch.cuda.Stream()  # the warm-up's
        self.capture_stream = torch.cuda.Stream()  # ours alone, even after a failed capture
        self.routing = ROUTINGS[0]
        self.off = False
        self.failure = ""  # why a capture failed
        self.replays = 0

    def prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        """On the host, before the batch goes to the GPU: its label index, and a short pack
        padded (pad_pack), so that packs of similar size replay one graph."""
        return pad_pack(with_label_index(batch))

    def backward(self, batch: dict[str, Any], factor: float) -> tuple[torch.Tensor, Any]:
        """Run `batch` and backward of its loss sum times `factor`. Returns (loss sum, correct);
        after a replay they are the graph's own outputs, valid until the next call."""
        key = None if self.off else batch_key(batch, self.model.training)
        if key is None or not batch["labels"].is_cuda or batch["labels"].numel() > MAX_TOKENS:
            return self.eager(batch, factor)
        self.check_routing()
        captured = self.graphs.get(key)
        if captured is not None and captured.grads != self.grad_addresses():
            log.info("cuda graphs: the gradients moved (set to None?); capturing anew")
            self.drop_graphs()
            captured = None
        if captured is None:
            if key not in self.seen or len(self.graphs) >= self.max_graphs:
                self.seen.add(key)
                return self.eager(batch, factor)
            return self.warm_and_capture(key, batch, factor)
        for name, tensor in captured.inputs.items():
            tensor.copy_(batch[name], non_blocking=True)
        captured.factor.fill_(factor)
        captured.graph.replay()
        self.replays += 1
        return captured.loss, captured.correct

    def eager(self, batch: dict[str, Any], factor: float) -> tuple[torch.Tensor, Any]:
        return eager_pass(self.loss_fn, batch, factor)

    def check_routing(self) -> None:
        """Graphs captured before LoRA layers were routed or unrouted call stale code."""
        from selftune.accel.lora_routing import ROUTINGS

        if ROUTINGS[0] != self.routing:
            self.drop_graphs()
            self.routing = ROUTINGS[0]

    def drop_graphs(self) -> None:
        """Forget every graph; later ones take a new pool (torch's allocator fails an assertion
        when a capture joins the pool of graphs already freed)."""
        self.graphs.clear()
        self.pool = torch.cuda.graph_pool_handle()

    def grad_addresses(self) -> list[int]:
        return [0 if p.grad is None else p.grad.data_ptr() for p in self.params]

    def warm_and_capture(
        self, key: tuple, batch: dict[str, Any], factor: float
    ) -> tuple[torch.Tensor, Any]:
        """This batch's real pass, eager on a side stream (CUDA graphs want their warm-up
        there), then the capture of the same pass, which records and computes nothing."""
        for p in self.params:  # gradients allocated outside the graph, accumulated in place
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        main = torch.cuda.current_stream()
        torch.cuda.empty_cache()  # blocks cached for the main stream serve no other stream
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            loss_sum, correct = self.eager(batch, factor)
        main.wait_stream(self.side)
        for tensor in (loss_sum, correct):
            if isinstance(tensor, torch.Tensor):
                tensor.record_stream(main)
        torch.cuda.empty_cache()  # the side stream's cached blocks: the graph's pool needs them
        try:
            self.graphs[key] = self.capture(batch)
        except Exception as exc:  # an operation the graph cannot hold: eager from now on
            self.off, self.failure = True, f"{type(exc).__name__}: {exc}"
            log.info("cuda graphs: off for this run (capture failed: %s)", exc)
        return loss_sum, correct

    def capture(self, batch: dict[str, Any]) -> Captured:
        inputs = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
        static = {**batch, **inputs}
        factor = torch.zeros((), dtype=torch.float32, device=inputs["labels"].device)
        before = self.grad_addresses()
        backup = [p.grad.clone() for p in self.params]
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=self.capture_stream):
                loss_sum, _, correct = self.loss_fn(static)
                (loss_sum * factor).backward()
            if self.grad_addresses() != before:
                raise RuntimeError("backward did not accumulate into the gradients in place")
        except Exception:
            reset_generator()  # needed after a failed capture, harmless after one that held
            for p, saved in zip(self.params, backup):  # the capture computed nothing
                p.grad = saved
            raise
        if not isinstance(correct, torch.Tensor):
            correct = torch.tensor(correct)
        # detached: a live autograd graph would keep its AccumulateGrad nodes, bound to the
        # capture's stream, and later passes on another stream would then accumulate out of
        # place, into new gradient tensors
        return Captured(graph, inputs, factor, loss_sum.detach(), correct, before)


def reset_generator() -> None:
    """torch ends a capture that failed before it tells the CUDA generator, which then refuses
    every random op outside a capture ("Offset increment outside graph capture"): one capture
    that succeeds resets it."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=torch.cuda.Stream()):
        torch.empty(1, device="cuda").zero_()
