"""File helpers shared by every checkpoint writer: atomic single-file writes and directory sizes."""

from __future__ import annotations

import os
import tempfile


def atomic_write(path: str, data: bytes | str) -> None:
    """Writes `data` to a temporary file beside `path`, fsyncs it, then renames it onto `path`, so a crash never
    leaves a half-written file under the final name."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def dir_bytes(path: str) -> int:
    """Bytes of every file below `path` (the size of a checkpoint on disk)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
