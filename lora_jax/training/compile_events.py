"""How many times, and for how long, JAX compiled a given jitted function, from JAX's public `jax.monitoring` events.

JAX reports each compilation of a jitted function as three duration events carrying the function's name: tracing
(JAXPR_TRACE, "<__name__>"), lowering to MLIR (TO_MLIR, "jit(<__name__>)") and the backend compilation
(BACKEND_COMPILE, "jit(<__name__>)"). The backend event also covers a program read back from the persistent
compilation cache; such a read is announced just before by the nameless CACHE_HIT event, so it is counted as a cache
hit of the compilation that follows. One listener pair, registered when this module is first imported, keeps
`CompileStats` per name; functions whose compilations are counted get a name of their own from `unique_name`. The
stats are process-wide because JAX's compilation is process-wide; nothing else is kept here.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading

import jax

JAXPR_TRACE = "/jax/core/compile/jaxpr_trace_duration"
TO_MLIR = "/jax/core/compile/jaxpr_to_mlir_module_duration"
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
CACHE_HIT = "/jax/compilation_cache/cache_hits"


@dataclasses.dataclass
class CompileStats:
    """compilations: backend compilations (cache reads included); seconds: tracing + lowering + compiling (or
    reading from the persistent cache); cache_hits: compilations served by the persistent compilation cache."""

    compilations: int = 0
    seconds: float = 0.0
    cache_hits: int = 0

    def describe(self) -> str:
        """One line for a progress log, e.g. '2 compilations, 13.4 s (1 from the persistent cache)'."""
        cached = f" ({self.cache_hits} from the persistent cache)" if self.cache_hits else ""
        return f"{self.compilations} compilation{'s' * (self.compilations != 1)}, {self.seconds:.1f} s{cached}"


_stats: collections.defaultdict[str, CompileStats] = collections.defaultdict(CompileStats)
_pending_hit = threading.local()  # set by CACHE_HIT, consumed by the BACKEND_COMPILE event of the same thread
_ids = itertools.count()


def _plain_name(fun_name: str) -> str:
    return fun_name[4:-1] if fun_name.startswith("jit(") and fun_name.endswith(")") else fun_name


def _on_event_duration(event: str, duration_secs: float, **kwargs) -> None:
    if event not in (JAXPR_TRACE, TO_MLIR, BACKEND_COMPILE):
        return
    stats = _stats[_plain_name(kwargs.get("fun_name", ""))]
    stats.seconds += duration_secs
    if event == BACKEND_COMPILE:
        stats.compilations += 1
        if getattr(_pending_hit, "value", False):
            stats.cache_hits += 1
            _pending_hit.value = False


def _on_event(event: str, **kwargs) -> None:
    if event == CACHE_HIT:
        _pending_hit.value = True


jax.monitoring.register_event_duration_secs_listener(_on_event_duration)
jax.monitoring.register_event_listener(_on_event)


def unique_name(prefix: str) -> str:
    """`prefix` plus a number not handed out before in this process (a name to give a function that is counted)."""
    return f"{prefix}_{next(_ids)}"


def stats(fun_name: str) -> CompileStats:
    """A copy of the compile stats of the jitted function whose `__name__` is `fun_name`, since this module was
    imported."""
    return dataclasses.replace(_stats.get(fun_name, CompileStats()))


def compilations(fun_name: str) -> int:
    """Backend compilations of the jitted function whose `__name__` is `fun_name`, since this module was imported."""
    return stats(fun_name).compilations
