"""train_log.jsonl, the training history: written by train_lora, read by the training-curve plot, the
experiments table, the benchmarks and the tests.

One JSON object a line, each with "step" and "epoch", and then one of:
- a logging step: loss, grad_norm, learning_rate, tokens_per_s, samples_per_s, eta_s, and the running
  totals elapsed_s, tokens_seen (real tokens) and examples_seen over all processes, which go on across a
  resume; peak_gpu_mem_gb on CUDA;
- an evaluation: val_loss, and with select_best val_accuracy;
- the end of training: train_runtime_s and the totals;
- with select_best, last: best_step and best_val_accuracy.
After a resume the file still holds every step once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

NAME = "train_log.jsonl"


def read_history(path: str | os.PathLike) -> list[dict]:
    """The entries of a training history ([] if there is none)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def append_entry(path: str | os.PathLike, entry: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")


def cut_back(path: str | os.PathLike, step: int) -> None:
    """Keep the entries up to `step` (a checkpoint resumed from), so steps trained again are logged once."""
    entries = [e for e in read_history(path) if e["step"] <= step]
    Path(path).write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")


def logging_steps(entries: list[dict]) -> list[dict]:
    return [e for e in entries if "loss" in e]


def evaluations(entries: list[dict]) -> list[dict]:
    return [e for e in entries if "val_loss" in e or "val_accuracy" in e]


def last_totals(entries: list[dict]) -> dict:
    """The last entry with running totals ({} if none)."""
    return next((e for e in reversed(entries) if "elapsed_s" in e), {})


def best_entry(entries: list[dict]) -> dict:
    """select_best's closing entry ({} without one)."""
    return next((e for e in entries if "best_step" in e), {})
