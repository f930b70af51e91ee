"""Peak memory of one benchmark child process.

CPU: resident set size. `max_rss_bytes` is the process's lifetime peak (getrusage ru_maxrss); phase peaks come from
the kernel's high-water mark VmHWM, which `/proc/self/clear_refs` can reset, so the peak of "the steps only" excludes
what setup (building random weights, imports) needed. GPU: the accelerator's own peak-allocation counter instead
(JAX `device.memory_stats()['peak_bytes_in_use']`, torch `cuda.max_memory_allocated()`), passed in by the caller.
"""

from __future__ import annotations

import dataclasses
import gc
import resource
from typing import Any


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def max_rss_bytes() -> int:
    """Peak resident set size of this process over its whole life (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS. False where /proc/self/clear_refs is not writable."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset() -> int | None:
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


@dataclasses.dataclass
class Phase:
    """A measured stretch of the child: RSS when it began and whether its peak can be told apart from setup's."""

    start_rss_bytes: int | None
    resettable: bool
    peak_before_next: int | None = None  # the peak up to the start of the phase that followed this one


def start_phase(previous: Phase | None = None) -> Phase:
    """Begins a phase (resetting the RSS high-water mark). Pass the enclosing phase when nesting, so its peak so far
    is kept before the reset."""
    if previous is not None:
        previous.peak_before_next = _max(previous.peak_before_next, peak_rss_since_reset())
    return Phase(current_rss_bytes(), reset_peak_rss())


def _max(a: int | None, b: int | None) -> int | None:
    values = [v for v in (a, b) if v is not None]
    return max(values) if values else None


def memory_fields(run: Phase, steady: Phase | None, device_peak_bytes: int | None = None) -> dict[str, Any]:
    """The memory fields of a result line.

    peak_memory_bytes (what the table compares): device peak on an accelerator, else lifetime max RSS.
    setup_rss_bytes: RSS when `run` began (weights, optimizer state, batch resident, nothing compiled yet).
    run_peak_rss_bytes: peak RSS from `run`'s start to now (compilation and every step included).
    steady_peak_rss_bytes: peak RSS from `steady`'s start (after warm-up) to now: the timed steps alone.
    """
    now_peak = peak_rss_since_reset() if run.resettable else None
    if steady is not None:
        run_peak = _max(run.peak_before_next, now_peak)
        steady_peak = now_peak if steady.resettable else None
    else:
        run_peak, steady_peak = now_peak, None
    lifetime = max_rss_bytes()
    return {
        "peak_memory_bytes": device_peak_bytes if device_peak_bytes is not None else lifetime,
        "memory_kind": "device" if device_peak_bytes is not None else "rss",
        "max_rss_bytes": lifetime,
        "setup_rss_bytes": run.start_rss_bytes,
        "run_peak_rss_bytes": run_peak,
        "steady_peak_rss_bytes": steady_peak,
    }
