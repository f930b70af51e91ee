"""One writer per output directory: `<output_dir>/.lock` holds the owner's pid, host and command.

A second run into the same directory fails at once naming the owner. A lock left by a process that no longer exists
on this host (a killed run) is taken over with a warning. A lock from another host cannot be checked from here, so
it is never taken over: the message says how to remove it once that run is known to be gone. A multi-process job
holds one lock, taken by process 0; every process learns whether it was taken (`job_lock`), so all stop when it was not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import tempfile
import time

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"


class OutputDirLockedError(RuntimeError):
    """Another live run writes to the same output directory."""


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _owner_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)}


def _read_owner(path: str) -> dict | None:
    try:
        with open(path) as f:
            owner = json.load(f)
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _create_exclusive(path: str, record: dict) -> bool:
    """Writes `record` to `path` only if `path` does not exist (link of a complete temp file: atomic) -> success."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".lock-tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


class OutputDirLock:
    """Context manager holding `<directory>/.lock` for the duration of a run."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK_NAME)
        self.record = _owner_record()

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if _create_exclusive(self.path, self.record):
            return
        owner = _read_owner(self.path)
        if owner is not None and (owner.get("host") != self.record["host"] or process_alive(owner["pid"])):
            raise OutputDirLockedError(
                f"{os.path.dirname(self.path)} is in use by another run (pid {owner['pid']} on {owner.get('host')}, "
                f"started {owner.get('started')}: {owner.get('command')}). Wait for it to finish, or set another "
                f"train.output_dir; if that run is gone, delete {self.path}")
        log.warning("taking over the lock %s of a run that no longer exists (%s)", self.path,
                    "pid %s on this host" % owner["pid"] if owner else "unreadable lock file")
        os.unlink(self.path)
        if not _create_exclusive(self.path, self.record):  # another process took it over first
            raise OutputDirLockedError(f"{os.path.dirname(self.path)} was just taken by another run; see {self.path}")

    def release(self) -> None:
        if _read_owner(self.path) == self.record:
            os.unlink(self.path)

    def __enter__(self) -> "OutputDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def release_own_lock(directory: str) -> None:
    """Removes `<directory>/.lock` if this process holds it (for a process that must end at once, e.g. when a peer
    of a multi-process job is lost)."""
    path = os.path.join(directory, LOCK_NAME)
    owner = _read_owner(path)
    if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        os.unlink(path)


@contextlib.contextmanager
def job_lock(directory: str):
    """Holds `<directory>/.lock` for a whole (possibly multi-process) job: process 0 takes it and every process
    raises OutputDirLockedError when it could not (a collective: every process of the job must enter it)."""
    from lora_jax.sharding import distributed

    lock, error = OutputDirLock(directory), None
    main = distributed.is_main_process()
    if main:
        try:
            lock.acquire()
        except OutputDirLockedError as e:
            error = e
    if distributed.any_process(error is not None):
        raise error or OutputDirLockedError(f"{directory} is in use by another run: process 0 of this job could not "
                                            f"take {lock.path} (its error says by whom)")
    try:
        yield lock
    finally:
        if main:
            lock.release()
