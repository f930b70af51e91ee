"""Training-state checkpoints for resuming: Orbax `CheckpointManager` over what changes during training.

Saved per step: the step counter, the trainable leaves (adapters; everything in full fine-tuning), the optimizer
state, and a small JSON (`extra`: data position, the run's fingerprint, ...). The frozen base is never written.

Hygiene, so that a damaged directory never costs a good checkpoint:
- Orbax writes each step to `<step>.orbax-checkpoint-tmp-*` and renames it when complete; leftovers of a killed or
  failed save are removed when the checkpointer opens the directory and when a save fails.
- A step found unreadable is renamed `<step>.corrupt` (kept for inspection, invisible to Orbax): it is never counted
  by `keep`, never restored again, and never blocks a new save of the same step number.
- Retention keeps the newest `keep` complete steps, plus the step the caller names as the last trusted one (a
  training loop's last checkpoint vouched for by a good loss), so a diverging run never deletes its last good state.
- In a multi-process job every process joins each save; Orbax renames a step into place only once every process
  has written its part, so a step directory on disk is one every process completed (`last_complete_step`), and a
  save some process never finished stays a temporary directory, removed at the next start. Files are moved or
  removed by process 0 alone; SIGTERM then reaches the loop through JAX's preemption sync (`should_stop`), so every
  process stops at the same step.
- A save that fails for lack of space raises `CheckpointWriteError` naming the path, the size needed and the free
  space, after removing the partial write; the previous checkpoint is untouched.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import shutil
import signal
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from lora_jax.sharding import distributed
from lora_jax.training.orbax_reads import quiet_failed_reads
from lora_jax.tree import tree_bytes

log = logging.getLogger(__name__)
TMP_MARKER = ".orbax-checkpoint-tmp"
CORRUPT_SUFFIX = ".corrupt"


def last_complete_step(directory: str) -> int | None:
    """The newest step directory in `directory` (numbered, not temporary or set aside: a save every process of the
    job finished), or None."""
    try:
        names = os.listdir(directory)
    except OSError:
        return None
    return max((int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n))), default=None)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the message says where and what is still intact."""


def remove_partial_saves(directory: str) -> list[str]:
    """Deletes the temporary directories of saves that never completed in `directory` -> the paths removed."""
    removed = sorted(glob.glob(os.path.join(glob.escape(directory), f"*{TMP_MARKER}*")))
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
        log.warning("removed the partial checkpoint save %s (a save that never completed)", path)
    return removed


def move_aside(directory: str, step: int, suffix: str = CORRUPT_SUFFIX) -> str:
    """Renames checkpoint `step` to `<step><suffix>` (or `<step><suffix>-2`, ...) -> the new path."""
    source = os.path.join(directory, str(step))
    target, n = source + suffix, 1
    while os.path.exists(target):
        n += 1
        target = f"{source}{suffix}-{n}"
    os.rename(source, target)
    return target


def _is_out_of_space(error: BaseException) -> bool:
    text = str(error)
    # TensorStore reports a full disk as a RESOURCE_EXHAUSTED status inside a ValueError, not as an OSError.
    return (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or any(
        marker in text for marker in ("No space left", "RESOURCE_EXHAUSTED", "Disk quota exceeded"))


class TrainCheckpointer:
    """Keeps the last `keep` checkpoints of a run in `directory`, saving every `save_every` steps and on SIGTERM."""

    def __init__(self, directory: str, keep: int = 2, save_every: int = 100, handle_sigterm: bool = True):
        self.directory = os.path.abspath(directory)
        self.save_every = save_every
        self.keep = keep
        self._stop = False
        os.makedirs(self.directory, exist_ok=True)
        if distributed.is_main_process():
            remove_partial_saves(self.directory)
        distributed.barrier("lora_jax.checkpoint.open")
        # Retention is `prune`'s (Orbax's max_to_keep cannot protect an older trusted step).
        options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        if handle_sigterm and jax.process_count() == 1:  # several processes: JAX's preemption sync handles SIGTERM
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):  # preemption: finish the step in flight, save, stop
        log.warning("SIGTERM received: saving a checkpoint and stopping after this step")
        self._stop = True

    def should_stop(self, step: int | None = None) -> bool:
        """True after SIGTERM or when Orbax sees a preemption notice (multi-host TPU)."""
        return self._stop or (step is not None and self.manager.reached_preemption(step))

    def steps(self) -> list[int]:
        """The complete checkpoints on disk, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def due(self, step: int) -> bool:
        return step > 0 and step % self.save_every == 0 and step not in self.manager.all_steps()

    def prune(self, also_keep: int | None = None) -> None:
        """Deletes all but the newest `keep` steps and `also_keep`."""
        steps = self.steps()
        for step in steps[self.keep:]:
            if step != also_keep:
                self.manager.delete(step)

    def save(self, step: int, state: Any, extra: dict, also_keep: int | None = None) -> bool:
        """Saves `state` (a pytree without the frozen base) and `extra` (JSON) at `step`, then prunes old steps
        (keeping `also_keep`); False if `step` exists."""
        if step in self.manager.all_steps():
            return False
        try:
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            extra=ocp.args.JsonSave(extra)), force=True)
            self.manager.wait_until_finished()
        except Exception as e:
            if not _is_out_of_space(e):
                raise
            remove_partial_saves(self.directory)
            self.manager.reload()
            previous = self.steps()
            intact = f"the previous checkpoint (step {previous[0]}) is intact" if previous else "no earlier checkpoint exists"
            raise CheckpointWriteError(
                f"no space left to write checkpoint step {step} in {self.directory}: it needs about "
                f"{tree_bytes(state) / 2**20:.1f} MiB, {shutil.disk_usage(self.directory).free / 2**20:.1f} MiB are "
                f"free there; {intact}. Free some space (or set train.output_dir elsewhere) and re-run to resume") from None
        self.prune(also_keep)
        return True

    def maybe_save(self, step: int, state: Any, extra: dict, force: bool = False, also_keep: int | None = None) -> bool:
        """Saves at `step` when due (every `save_every` steps) or forced; False when nothing was written."""
        if not (force or self.due(step)):
            return False
        return self.save(step, state, extra, also_keep)

    def set_aside(self, step: int, reason: BaseException | str, suffix: str = CORRUPT_SUFFIX,
                  what: str = "is unreadable") -> None:
        """Moves checkpoint `step` (unreadable, or not trusted) out of Orbax's sight to `<step><suffix>`, saying why."""
        path = os.path.join(self.directory, f"{step}{suffix}")
        if distributed.is_main_process():
            path = move_aside(self.directory, step, suffix)
        distributed.barrier(f"lora_jax.checkpoint.set_aside.{step}{suffix}")
        self.manager.reload()
        detail = reason if isinstance(reason, str) else f"{type(reason).__name__}: {str(reason)[:300]}"
        log.error("checkpoint step %d in %s %s (%s); moved it to %s", step, self.directory, what, detail, path)

    def read_extra(self, step: int) -> dict:
        """The JSON saved with checkpoint `step` (raises if it cannot be read)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
        return dict(restored["extra"])

    def restore(self, step: int, abstract_state: Any) -> Any:
        """The state saved at `step`, restored into the structure (and shardings) of `abstract_state`."""
        abstract = jax.tree_util.tree_map(
            lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            abstract_state,
        )
        with quiet_failed_reads(os.path.join(self.directory, str(step))):
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return restored["state"]

    def restore_latest(self, abstract_state: Any, accept: Callable[[int, dict], bool] | None = None
                       ) -> tuple[Any, dict, int] | None:
        """(state, extra, step) from the newest readable checkpoint, or None when there is none; unreadable steps are
        set aside on the way. `accept(step, extra)` may raise to refuse resuming (e.g. another configuration); when
        it returns False, a failing restore is an error (the arrays may not fit by design) rather than corruption."""
        for step in self.steps():
            try:
                extra = self.read_extra(step)
            except Exception as e:  # orbax raises many types for damaged files; every one means "unreadable"
                self.set_aside(step, e)
                continue
            exact = True if accept is None else accept(step, extra)
            try:
                return self.restore(step, abstract_state), extra, step
            except Exception as e:
                if not exact:
                    raise ValueError(f"checkpoint step {step} in {self.directory} does not fit this run's arrays "
                                     f"({type(e).__name__}: {str(e)[:200]}): the changes alter the trained shapes, "
                                     "so this run cannot continue from it; start fresh in another train.output_dir") from None
                self.set_aside(step, e)
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
