"""How many times XLA compiled a given jitted function, from JAX's public `jax.monitoring` compile events.

JAX reports every backend compilation as the duration event BACKEND_COMPILE with the compiled function's name
("jit(<__name__>)"). One listener, registered when this module is first imported, counts them by name; functions
whose compilations are counted get a name of their own from `unique_name`. The counts are process-wide because
JAX's compilation is process-wide; nothing else is kept here.
"""

from __future__ import annotations

import collections
import itertools

import jax

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"

_counts: collections.Counter[str] = collections.Counter()
_ids = itertools.count()


def _on_event_duration(event: str, duration_secs: float, **kwargs) -> None:
    if event == BACKEND_COMPILE:
        _counts[kwargs.get("fun_name", "")] += 1


jax.monitoring.register_event_duration_secs_listener(_on_event_duration)


def unique_name(prefix: str) -> str:
    """`prefix` plus a number not handed out before in this process (a name to give a function that is counted)."""
    return f"{prefix}_{next(_ids)}"


def compilations(fun_name: str) -> int:
    """Backend compilations of the jitted function whose `__name__` is `fun_name`, since this module was imported."""
    return _counts[f"jit({fun_name})"]
