"""File helpers shared by every checkpoint writer: atomic single-file writes, directory sizes, and digests of the
files a checkpoint was saved as (to tell a damaged checkpoint from a good one before reading it)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Any, Callable


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


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digests(directory: str) -> dict[str, dict]:
    """{path relative to `directory`: {"bytes": size, "sha256": hex digest}} of every file below it, to store beside a
    checkpoint and check with `damaged_files` before reading it back."""
    out = {}
    for d, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(d, f)
            out[os.path.relpath(path, directory)] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    return dict(sorted(out.items()))


def damaged_files(directory: str, digests: dict[str, dict]) -> list[str]:
    """What differs below `directory` from `digests` (file_digests' output at save time): missing files, files of
    another size (truncated), files of other bytes (bit flips); [] when every recorded file is intact."""
    problems = []
    for rel, want in digests.items():
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            problems.append(f"{rel} is missing")
        elif (size := os.path.getsize(path)) != want["bytes"]:
            problems.append(f"{rel} has {size} bytes, {want['bytes']} were saved")
        elif _sha256(path) != want["sha256"]:
            problems.append(f"{rel} holds other bytes than were saved (sha256 differs)")
    return problems


def directory_entries(directory: str) -> list[str]:
    """The names in `directory` ([] when it does not exist); a FileExistsError when it is a file."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise FileExistsError(f"{directory} is a file, not a directory")
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def write_directory(directory: str, write: Callable[[str], Any]) -> Any:
    """`write(tmp)` fills a fresh directory beside `directory`, which then replaces `directory` (removing what was
    there). A failure in `write` leaves `directory` untouched; the old directory is moved aside before the new one is
    renamed into place, so the name never holds a mix of old and new files (a crash between the two renames leaves the
    old one beside it as `.<name>.old*`)."""
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp", dir=parent)
    try:
        result = write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(directory):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old", dir=parent)
        os.rename(directory, os.path.join(old, "previous"))
    os.rename(tmp, directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return result


PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
MODEL_FILES = ("model.safetensors", "flax_model.msgpack", "pytorch_model.bin", "model.safetensors.index.json")


def refuse_mixed_directory(directory: str, writing: str, others: tuple[str, ...], kind: str) -> None:
    """A FileExistsError when `directory` holds files of another kind of checkpoint (`others`, a `kind`): writing
    `writing` beside them would leave a directory that loads as either."""
    found = [name for name in directory_entries(directory) if name in others]
    if found:
        raise FileExistsError(f"{directory} already holds {kind} ({', '.join(found)}); writing {writing} beside it would "
                              "leave a directory that loads as either. Write to a new directory, or remove it first")
