"""The divergence guard of a run: what stops a run that has gone wrong before it is saved as if it were fine.

On device, every step: `train_update` poisons the gradient of a step whose loss or gradient norm is not finite, and
`optax.apply_if_finite` around the optimizer (see `guard_optimizer`) skips it: the trainable leaves and the optimizer
state stay as they were, and the optimizer state counts skipped steps (in a row, and in total). No host sync.

On the host, only where the loop already reads metrics (each log step, and before each save): `check` reads those
counters and the step's loss and says why the run must stop, if it must: `max_nonfinite_steps` skipped steps in a row,
or OUTLIER_PATIENCE checks in a row whose loss is above `divergence_factor` times the median of the earlier good
losses (and at least `MIN_RISE` above it, so that near-zero losses do not trip it). Outliers stay out of the median.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any

import jax
import optax

# Skipped steps are never applied: the count that would make apply_if_finite give up is out of reach.
NEVER_GIVE_UP = 2**30
MEDIAN_WINDOW = 20  # logged losses the running median is taken over
MIN_HISTORY = 2  # logged losses needed before the loss rule applies
MIN_RISE = 1.0  # nats: a loss must also be this much above the median to count as diverging
# A single hard batch can spike the loss of a healthy run; a diverged run stays high. Checks in a row needed:
OUTLIER_PATIENCE = 3


class TrainingDivergedError(RuntimeError):
    """The run stopped at `step` because its loss or gradients went bad; the last good checkpoint is kept."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def guard_optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` that skips (and counts) updates whose gradient has a non-finite entry."""
    return optax.apply_if_finite(tx, max_consecutive_errors=NEVER_GIVE_UP)


def skipped_counts(opt_state: Any) -> tuple[int, int]:
    """(skipped in a row, skipped in total) from the state of a `guard_optimizer` (reads the device)."""
    in_a_row = optax.tree_utils.tree_get(opt_state, "notfinite_count")
    total = optax.tree_utils.tree_get(opt_state, "total_notfinite")
    return int(jax.device_get(in_a_row)), int(jax.device_get(total))


@dataclasses.dataclass(frozen=True)
class GuardSettings:
    max_nonfinite_steps: int
    divergence_factor: float | None


def loss_outlier(settings: GuardSettings, loss: float, history: tuple[float, ...]) -> str | None:
    """Why `loss` looks diverged against the earlier good losses in `history` (oldest first), or None."""
    if settings.divergence_factor is None or len(history) < MIN_HISTORY or not math.isfinite(loss):
        return None
    median = statistics.median(history[-MEDIAN_WINDOW:])
    if loss > settings.divergence_factor * median and loss > median + MIN_RISE:
        return (f"the loss {loss:.4g} is above {settings.divergence_factor:g} x the median {median:.4g} of the last "
                f"{len(history[-MEDIAN_WINDOW:])} good logged losses (train.divergence_factor)")
    return None


def divergence(settings: GuardSettings, skipped_in_a_row: int, outliers_in_a_row: int, outlier: str | None) -> str | None:
    """Why the run must stop (None: it may go on): `max_nonfinite_steps` skipped steps in a row, or OUTLIER_PATIENCE
    checks in a row whose loss was an outlier (`outlier` describes the latest)."""
    if skipped_in_a_row >= settings.max_nonfinite_steps:
        return (f"{skipped_in_a_row} steps in a row had a non-finite loss or gradient norm and were skipped "
                f"(train.max_nonfinite_steps = {settings.max_nonfinite_steps})")
    if outlier is not None and outliers_in_a_row >= OUTLIER_PATIENCE:
        return f"{outlier}, at {outliers_in_a_row} checks in a row"
    return None


def all_finite(tree: Any) -> bool:
    """Whether every entry of every leaf is finite (one device reduction, then a host read)."""
    leaves = [jax.numpy.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)]
    return bool(jax.device_get(jax.numpy.stack(leaves).all())) if leaves else True


def remember(history: tuple[float, ...], loss: float) -> tuple[float, ...]:
    """The history with a finite `loss` appended (at most MEDIAN_WINDOW kept)."""
    return (history + (loss,))[-MEDIAN_WINDOW:] if math.isfinite(loss) else history
