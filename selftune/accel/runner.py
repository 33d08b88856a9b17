"""The one interface the training loop has to the fast path: `enable` patches what runs on this
device and returns a StepRunner, which runs each micro-batch's forward and backward (eagerly,
or replayed as a CUDA graph) and undoes the patches when closed."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from selftune.accel.fast_path import disable_fast_path, enable_fast_path
from selftune.accel.memory import choose_checkpointing, set_checkpointing
from selftune.accel.step_graphs import StepGraphs, eager_pass, planned_tokens
from selftune.data.batches import with_label_index

log = logging.getLogger(__name__)


def step_graphs_fit(
    cuda_graphs: bool, train_type: str, device: str, several: bool, dtype: torch.dtype
) -> bool:
    """Whether training passes may replay as CUDA graphs: LoRA on one CUDA device, weights
    already in the compute dtype (autocast's weight cache outlives a capture). Checkpointed
    layers replay too: their recompute draws the forward's dropout masks again
    (tests/accel/test_step_graphs.py, on a GPU)."""
    return (
        cuda_graphs
        and device.startswith("cuda")
        and not several
        and train_type == "lora"
        and dtype != torch.float32
    )


@dataclass
class StepRunner:
    """Runs micro-batches for the loop. `graphed`: passes may replay as CUDA graphs once `bind`
    has given the loss and the trainable parameters."""

    model: Any  # the causal LM the fast path patched
    graphed: bool = False
    loss_fn: Callable[[dict[str, Any]], tuple] | None = None
    graphs: StepGraphs | None = None
    enabled: list[str] = field(default_factory=list)

    def bind(self, loss_fn: Callable, module: Any, trainable: list[torch.nn.Parameter]) -> None:
        """`loss_fn(batch)` -> (loss sum, count, correct); `module` what trains (its train/eval
        mode); `trainable` the parameters the graphs accumulate gradients into."""
        self.loss_fn = loss_fn
        if self.graphed:
            self.graphs = StepGraphs(loss_fn, module, trainable)

    @property
    def keeps_gradients(self) -> bool:
        """Whether the gradient tensors must stay allocated between steps (graphs add into
        them in place): zero_grad(set_to_none=False)."""
        return self.graphs is not None

    def prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        """On the host, before the batch goes to the device."""
        return with_label_index(batch) if self.graphs is None else self.graphs.prepare(batch)

    def backward(self, batch: dict[str, Any], factor: float) -> tuple[torch.Tensor, Any]:
        """Forward and backward of `batch`'s loss sum times `factor`: (loss sum, correct)."""
        if self.graphs is not None:
            return self.graphs.backward(batch, factor)
        return eager_pass(self.loss_fn, batch, factor)

    def close(self) -> None:
        """Say what replayed; give the model back its library forwards."""
        if self.graphs is not None and self.graphs.replays:
            log.info(
                "cuda graphs: %d passes replayed from %d shapes",
                self.graphs.replays,
                len(self.graphs.graphs),
            )
        disable_fast_path(self.model)


def enable(
    model: Any,
    device: str,
    packed: bool,
    several: bool,
    largest_tokens: int,
    gradient_checkpointing: bool | None,
    cuda_graphs: bool,
    train_type: str,
) -> StepRunner:
    """Patch `model` (the causal LM, adapters attached) for training on `device`: the kernels
    that run here, and gradient checkpointing on as many layers as memory needs for passes of
    up to `largest_tokens` tokens. `packed`: rows arrive packed; `several`: under torchrun."""
    enabled = enable_fast_path(model, device, packed)
    if enabled:
        log.info("fast path: %s", ", ".join(enabled))
    dtype = next(model.parameters()).dtype
    graphed = step_graphs_fit(cuda_graphs, train_type, device, several, dtype)
    largest, graph_tokens = planned_tokens(largest_tokens) if graphed else (largest_tokens, 0)
    layers, said = choose_checkpointing(
        model, gradient_checkpointing, device, largest, graph_tokens
    )
    log.info("memory: %s", said)
    set_checkpointing(model, layers)
    return StepRunner(model, graphed, enabled=enabled)
