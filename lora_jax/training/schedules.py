"""Learning-rate schedules for training runs (optax schedules: step -> learning rate)."""

from __future__ import annotations

import optax


def learning_rate_schedule(
    learning_rate: float, total_steps: int, warmup_steps: int = 0, schedule: str = "linear"
) -> optax.Schedule:
    """Linear warm-up from 0, then linear decay to 0, cosine decay to 0, or constant."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup_steps, 1)
    if schedule == "linear":
        decay = optax.linear_schedule(learning_rate, 0.0, decay_steps)
    elif schedule == "cosine":
        decay = optax.cosine_decay_schedule(learning_rate, decay_steps)
    elif schedule == "constant":
        decay = optax.constant_schedule(learning_rate)
    else:
        raise ValueError(f"schedule must be 'linear', 'cosine' or 'constant', got {schedule!r}")
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])
