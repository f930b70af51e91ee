"""Learning-rate sweeps that never stop at an edge: when the best rate is the smallest or largest tried, the sweep
goes one grid step further that way, until the best rate has a tried neighbour on both sides (or the grid ends, which
the result says)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

# Half-decade grid 1e-6 .. 3e-1 (1, 3, 10, 30, ...): neighbours differ by ~3x, the usual sweep spacing.
GRID = tuple(sorted(float(f"{m}e{e}") for e in range(-6, 0) for m in (1, 3)))


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """scores: {learning rate: validation score} of every rate tried; best: the chosen rate; edge: True when the best
    rate is still an end of what was tried (the grid ran out or max_extensions was reached)."""

    scores: dict[float, float]
    best: float
    edge: bool


def _index(lr: float) -> int:
    for i, g in enumerate(GRID):
        if abs(g - lr) <= 1e-9 * g:
            return i
    raise ValueError(f"learning rate {lr:g} is not on the sweep grid {', '.join(f'{g:g}' for g in GRID)}")


def is_edge(scores: dict[float, float]) -> tuple[float, int]:
    """(best rate, direction): -1 if it is the smallest rate tried, +1 the largest, 0 interior (ties: the rate nearest
    the middle of those tried wins, so a flat sweep stops instead of wandering off)."""
    rates = sorted(scores)
    middle = (len(rates) - 1) / 2
    best = rates[max(range(len(rates)), key=lambda i: (scores[rates[i]], -abs(i - middle)))]
    if len(rates) < 2:
        return best, 0
    return best, -1 if best == rates[0] else 1 if best == rates[-1] else 0


def sweep(score: Callable[[float], float], start: Sequence[float], *, max_extensions: int = 3) -> SweepResult:
    """Tries every rate in `start` (grid points), then extends one grid step at a time past an edge pick.
    score(lr) -> validation score (higher is better)."""
    scores = {lr: score(lr) for lr in sorted(start)}
    best, direction = is_edge(scores)
    for _ in range(max_extensions):
        if direction == 0:
            break
        nxt = _index(best) + direction
        if not 0 <= nxt < len(GRID):
            break
        scores[GRID[nxt]] = score(GRID[nxt])
        best, direction = is_edge(scores)
    return SweepResult(scores=scores, best=best, edge=direction != 0)
