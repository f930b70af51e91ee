"""Orbax restores that fail with one exception and nothing else printed.

Where the noise of a failed restore comes from: Orbax (`asyncio_utils.run_sync`) runs the restore as
`loop.run_until_complete(asyncio.gather(<one read per array>))` on a fresh event loop and closes that loop in a
`finally`. When one array cannot be read (damaged files), gather raises at once and the loop is closed while TensorStore
still has the other arrays' reads in flight. Those reads finish a moment later on TensorStore's threads, and their
completion callbacks call `loop.call_soon_threadsafe` on the closed loop: each raises `RuntimeError: Event loop is
closed` inside a C callback, which Python prints through `sys.unraisablehook` (one traceback per pending read). The
abandoned tasks' own exceptions are then logged by asyncio ("Task exception was never retrieved") when they are
garbage-collected. Neither report says anything the raised exception does not, so while a restore runs, and after one
has failed, exactly those two kinds of report are dropped; the failure itself reaches the caller as usual.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any

import orbax.checkpoint as ocp

_state = {"restoring": 0, "failed_paths": set(), "hook": None, "log_filter": None}


def _is_closed_loop_report(unraisable) -> bool:
    return isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"


def _unraisable_hook(previous):
    def hook(unraisable):
        if (_state["restoring"] or _state["failed_paths"]) and _is_closed_loop_report(unraisable):
            return  # a late TensorStore callback of a failed restore (see the module docstring)
        previous(unraisable)

    return hook


class _AbandonedReads(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for reads of a checkpoint whose restore failed."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        abandoned = record.getMessage().startswith("Task exception was never retrieved") and exc is not None
        return not (abandoned and any(path in str(exc) for path in _state["failed_paths"]))


def _install() -> None:
    """Wraps the current sys.unraisablehook (again if someone replaced ours, as pytest does per test) and filters
    asyncio's logger, once."""
    if sys.unraisablehook is not _state["hook"]:
        _state["hook"] = sys.unraisablehook = _unraisable_hook(sys.unraisablehook)
    if _state["log_filter"] is None:
        _state["log_filter"] = _AbandonedReads()
        logging.getLogger("asyncio").addFilter(_state["log_filter"])


@contextlib.contextmanager
def quiet_failed_reads(path: str):
    """Runs an Orbax restore of the checkpoint at `path`: a failure raises as usual, and the late reports of the reads
    it abandoned are not printed (see the module docstring)."""
    _install()
    _state["restoring"] += 1
    try:
        yield
    except Exception:
        _state["failed_paths"].add(path)
        raise
    finally:
        _state["restoring"] -= 1


def restore(path: str, target: Any) -> Any:
    """`ocp.StandardCheckpointer().restore(path, target)`; on failure the exception is raised and the late reports of
    the reads it abandoned are not printed. `path` must be absolute (Orbax requires it)."""
    with quiet_failed_reads(path):
        return ocp.StandardCheckpointer().restore(path, target)
