"""Training-state checkpoints for resuming: Orbax `CheckpointManager` over what changes during training.

Saved per step: the step counter, the trainable leaves (adapters; everything in full fine-tuning), the optimizer
state, and a small JSON of the data position and RNG seed. The frozen base is never written. Orbax writes each step
to a temporary directory and renames it when complete, so a killed save leaves no step that looks valid; a step that
is corrupt anyway (truncated or deleted files) is reported and skipped in favour of the one before it.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class TrainCheckpointer:
    """Keeps the last `keep` checkpoints of a run in `directory`, saving every `save_every` steps and on SIGTERM."""

    def __init__(self, directory: str, keep: int = 2, save_every: int = 100, handle_sigterm: bool = True):
        self.directory = os.path.abspath(directory)
        self.save_every = save_every
        self._stop = False
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        if handle_sigterm:
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):  # preemption: finish the step in flight, save, stop
        log.warning("SIGTERM received: saving a checkpoint and stopping after this step")
        self._stop = True

    def should_stop(self, step: int | None = None) -> bool:
        """True after SIGTERM or when Orbax sees a preemption notice (multi-host TPU)."""
        return self._stop or (step is not None and self.manager.reached_preemption(step))

    def maybe_save(self, step: int, state: Any, extra: dict, force: bool = False) -> bool:
        """Saves `state` (a pytree without the frozen base) and `extra` (JSON) at `step` when due or forced."""
        if not force and (step == 0 or step % self.save_every):
            return False
        if step in self.manager.all_steps():
            return False
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)), force=True
        )
        self.manager.wait_until_finished()
        return True

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict, int] | None:
        """(state, extra, step) from the newest readable checkpoint, or None when there is none.

        abstract_state: the state's structure (arrays or jax.ShapeDtypeStruct, with shardings to restore into)."""
        abstract = jax.tree_util.tree_map(
            lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            abstract_state,
        )
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore())
                )
            except Exception as e:  # orbax raises many types for damaged files; every one means "unreadable"
                log.error(
                    "checkpoint step %d in %s is unreadable (%s: %s); falling back to the previous one",
                    step, self.directory, type(e).__name__, str(e)[:300],
                )
                continue
            return restored["state"], dict(restored["extra"]), step
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
