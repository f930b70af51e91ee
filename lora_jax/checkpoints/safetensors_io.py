"""safetensors files read one tensor at a time, and written or read with bfloat16 tensors.

`LazySafetensors(directory)` is a read-only mapping {PyTorch name: numpy array} over `model.safetensors` (or the
shards named by `model.safetensors.index.json`) that reads a tensor only when it is looked up, so a loader that
converts each tensor before looking up the next (to bfloat16, or quantised) never holds the whole float32 model.
`safetensors.numpy` has no bfloat16, so `save_tensors` / `load_tensors` write and read the format themselves
(an 8-byte little-endian header length, a JSON header of {name: dtype, shape, data_offsets}, then the raw bytes).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class LazySafetensors(Mapping):
    """{tensor name: numpy array} over a checkpoint directory's safetensors file(s), each read when looked up."""

    def __init__(self, directory: str):
        from safetensors import safe_open

        index = os.path.join(directory, SAFE_INDEX)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        else:
            weight_map = None
        files = sorted(set(weight_map.values())) if weight_map else [SAFE_WEIGHTS]
        self._handles = {name: safe_open(os.path.join(directory, name), framework="numpy") for name in files}
        self._where = {key: name for name, handle in self._handles.items() for key in handle.keys()}

    def __getitem__(self, key: str) -> np.ndarray:
        return self._handles[self._where[key]].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def save_tensors(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """The bytes of a safetensors file holding `tensors` (numpy arrays, bfloat16 included), in sorted name order."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    chunks, offset = [], 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in NAMES:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot hold here")
        data = array.tobytes()
        header[name] = {"dtype": NAMES[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-len(text)) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def load_tensors(path: str) -> dict[str, np.ndarray]:
    """{name: numpy array} of a safetensors file (bfloat16 included)."""
    with open(path, "rb") as f:
        blob = f.read()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + length])
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which lora_jax cannot read")
        start, end = info["data_offsets"]
        data = blob[8 + length + start: 8 + length + end]
        out[name] = np.frombuffer(data, DTYPES[info["dtype"]]).reshape(info["shape"]).copy()
    return out
