"""Several processes, one training run: torchrun + FSDP2, PyTorch's own distributed engine.

Every rank builds the same data and the same step groups; rank r trains micro-batches r, r+W, ...
of each step's group, so no row is seen twice in an epoch. Rank 0 alone prints and writes.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def ranks() -> Ranks:
    """This process's place in the run (rank 0 of 1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return Ranks()


def setup() -> Ranks:
    """Join the process group torchrun describes in the environment (NCCL on CUDA, else gloo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return ranks()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    return ranks()


def torchrun_command(argv: list[str]) -> list[str] | None:
    """`NPROC_PER_NODE=N selftune sft ...` relaunches itself under torchrun, as ms-swift does."""
    n = os.environ.get("NPROC_PER_NODE")
    if not n or int(n) <= 1 or "LOCAL_RANK" in os.environ:
        return None
    port = os.environ.get("MASTER_PORT", "29500")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={int(n)}",
        f"--master_port={port}",
        "-m",
        "selftune",
        *argv,
    ]


def rank_share(group: list, rank: int, ranks: int) -> tuple[list, int]:
    """This rank's micro-batches of a step (r, r+W, ...), padded with stand-ins (trained at
    weight 0) so every rank runs as many forward/backward passes, as FSDP's collectives need.
    Returns (micro-batches, stand-ins at the end)."""
    mine = group[rank::ranks]
    need = math.ceil(len(group) / ranks)
    return mine + [group[0]] * (need - len(mine)), need - len(mine)


def barrier() -> None:
    if ranks().active:
        dist.barrier()


def all_sum(values: list[float]) -> list[float]:
    """Sum numbers over ranks (float64, so token counts stay exact)."""
    if not ranks().active:
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast(value: Any) -> Any:
    """Rank 0's value on every rank (a run folder name, say)."""
    if not ranks().active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The repeated blocks FSDP2 shards one by one (Llama, Qwen2 and most decoders)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(inner.get_decoder(), "layers", None)
    if layers is None:
        raise RuntimeError(f"{type(inner).__name__}: no decoder layers to shard")
    return list(layers)


def shard(root: torch.nn.Module, model: Any) -> None:
    """fully_shard each decoder layer, then the root (embeddings, final norm, head). On CUDA the
    weights compute in bf16 and gradients reduce in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    options: dict[str, Any] = {}
    if torch.cuda.is_available():
        options["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(root, **options)
