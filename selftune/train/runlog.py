"""The run's log: one JSON object per logged step in logging.jsonl, and the loss curve as a PNG."""

from __future__ import annotations

import json
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def plot_loss(records: list[dict[str, Any]], path: Path) -> None:
    """The loss curve as a PNG, drawn by matplotlib's Agg without pyplot (no GUI backend, no
    global figure state)."""
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def append_log(run_dir: Path, record: dict[str, Any]) -> None:
    with (run_dir / "logging.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def read_log(run_dir: Path, up_to_step: int | None = None) -> list[dict[str, Any]]:
    path = run_dir / "logging.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if up_to_step is None or r["step"] <= up_to_step]


@dataclass
class LossWindow:
    """The loss and token accuracy since the last logged step: token means over the window."""

    loss: float = 0.0
    tokens: int = 0
    correct: int = 0

    def add(self, loss_sum: float, tokens: int, correct: int) -> None:
        self.loss += loss_sum
        self.tokens += tokens
        self.correct += correct

    def take(self) -> dict[str, float]:
        """The window's means, and a fresh window from here."""
        means = {
            "loss": round(self.loss / max(1, self.tokens), 6),
            "token_acc": round(self.correct / max(1, self.tokens), 6),
        }
        self.loss, self.tokens, self.correct = 0.0, 0, 0
        return means


def restart_log(run_dir: Path, up_to_step: int) -> None:
    """Keep the records up to `up_to_step` (a resume drops what the lost steps logged)."""
    records = read_log(run_dir, up_to_step)
    (run_dir / "logging.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
