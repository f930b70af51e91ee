"""Where a run's metrics go: JSON lines, TensorBoard event files, and a loss-curve PNG at the end.

Only the main process writes (multi-host runs call these on every process; the others are no-ops)."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import jax


def _scalar(v: Any) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


class MetricsLog:
    """Appends `{"step", "split", "time", **metrics}` records to `<dir>/metrics.jsonl` and TensorBoard scalars to
    `<dir>/tensorboard/`, continuing a run that resumes from checkpoint step `resume_step` (0: a fresh start).

    The record stays true across kills and resumes: records after `resume_step` (steps the resumed run takes again)
    are dropped from metrics.jsonl, and TensorBoard is told to purge its events from `resume_step + 1` on, so every
    step appears once."""

    def __init__(self, directory: str, enabled: bool | None = None, resume_step: int = 0):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(directory, "metrics.jsonl")
        self._tb = None
        if self.enabled:
            os.makedirs(directory, exist_ok=True)
            drop_records_after(self.path, resume_step if resume_step > 0 else None)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(directory, "tensorboard"), purge_step=resume_step + 1 if resume_step else 0)

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, "time": time.time(), **{k: _scalar(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k not in ("step", "split", "time") and isinstance(v, float) and math.isfinite(v):  # TensorBoard rejects NaN
                self._tb.add_scalar(f"{split}/{k}", v, int(step))
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def drop_records_after(path: str, step: int | None) -> int:
    """Rewrites metrics.jsonl (atomically) without the records of steps after `step` (None: without any record)
    -> how many were dropped. A torn last line (a kill mid-write) is dropped too."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if step is not None and record.get("step", 0) <= step:
            kept.append(line)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return len(lines) - len(kept)


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(metrics_path: str, out_png: str) -> str | None:
    """Train loss (and eval loss when present) against step, from metrics.jsonl. Returns the PNG path."""
    records = read_metrics(metrics_path)
    train = sorted({r["step"]: r["loss"] for r in records if r["split"] == "train" and "loss" in r}.items())
    evals = sorted({r["step"]: r["loss"] for r in records if r["split"] == "eval" and "loss" in r}.items())
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
