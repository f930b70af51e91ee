"""Adapter-only checkpoints: the LoRA (and modules_to_save) leaves with Orbax, plus JSON metadata.

Layout of an adapter directory:
    params/            Orbax StandardCheckpointer tree of the adapter leaves (nested like the params)
    adapter_meta.json  {"format", "lora_config", "base_model", "base_fingerprint", "leaves": {path: shape}}

Saving writes everything into a temporary sibling directory and renames it into place at the end, so a crash never
leaves a directory that loads as a valid adapter, and an existing adapter is replaced only by a complete new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from lora_jax.lora.config import LoraConfig
from lora_jax.lora.transform import ADAPTER_LEAVES, LORA_A, LORA_MAGNITUDE, adapter_params, split_trainable
from lora_jax.tree import flatten_paths, unflatten_tree

META = "adapter_meta.json"
FORMAT = "lora_jax.adapter/1"


class AdapterMismatchError(ValueError):
    """An adapter whose leaves do not fit the base parameters it is loaded onto."""


def base_fingerprint(base_params: Mapping) -> dict:
    """Shapes of every base leaf (adapters excluded) plus a SHA-256 of a few frozen tensors' bytes: enough to tell
    "another model" (shapes) from "same architecture, other weights" (hash)."""
    flat = {k: v for k, v in flatten_paths(base_params).items() if k.rsplit("/", 1)[-1] not in ADAPTER_LEAVES}
    shapes = {k: list(np.shape(v)) for k, v in sorted(flat.items())}
    digest = hashlib.sha256()
    kernels = [k for k in sorted(flat) if k.endswith("/kernel")][:2]
    embeddings = [k for k in sorted(flat) if k.endswith("/embedding")][:1]
    for key in kernels + embeddings:
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(np.asarray(jax.device_get(flat[key]), np.float32)[:8]).tobytes())
    return {"shapes_sha256": hashlib.sha256(json.dumps(shapes).encode()).hexdigest(), "values_sha256": digest.hexdigest(),
            "num_leaves": len(flat)}


def save_adapter(
    directory: str,
    params: Mapping,
    config: LoraConfig,
    base_model: str = "",
    base_params: Mapping | None = None,
) -> str:
    """Writes the adapter of `params` (a tree holding adapters, or an adapter tree) to `directory`, atomically.

    base_params: the base the adapter was trained on (adapter leaves in it are ignored); defaults to `params`."""
    adapter = jax.device_get(adapter_params(params, config))
    if not jax.tree_util.tree_leaves(adapter):
        raise ValueError("no adapter leaves to save: params hold no lora_a/lora_b (and config has no modules_to_save)")
    adapter = jax.tree_util.tree_map(np.asarray, adapter)
    base = split_trainable(base_params if base_params is not None else params, config)[1]
    meta = {
        "format": FORMAT,
        "lora_config": config.to_dict(),
        "base_model": str(base_model),
        "base_fingerprint": base_fingerprint(base),
        "leaves": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in flatten_paths(adapter).items()},
    }
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp", dir=parent)
    try:
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(os.path.join(tmp, "params"), adapter)
        ckpt.wait_until_finished()
        with open(os.path.join(tmp, META), "w") as f:  # written last: its presence marks a complete adapter
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(directory):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old", dir=parent)
            os.rename(directory, os.path.join(old, "adapter"))
            os.rename(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def check_adapter_fits(adapter: Mapping, base_params: Mapping) -> None:
    """Raises AdapterMismatchError naming the first leaf whose shape does not fit the base (lora_a must be
    (kernel_in, r), lora_b (r, kernel_out), a modules_to_save leaf the base leaf's shape)."""
    base = flatten_paths(base_params)
    problems = []
    for key, value in flatten_paths(adapter).items():
        module, _, leaf = key.rpartition("/")
        shape = tuple(np.shape(value))
        if leaf in ADAPTER_LEAVES:
            kernel = base.get(module + "/kernel")
            if kernel is None:
                problems.append(f"{key}: the base has no kernel at {module}")
                continue
            k_in, k_out = np.shape(kernel)
            if leaf == LORA_MAGNITUDE:
                ok, want = shape == (k_out,), f"({k_out},)"
            else:
                ok = len(shape) == 2 and (shape[0] == k_in if leaf == LORA_A else shape[1] == k_out)
                want = f"({k_in}, r)" if leaf == LORA_A else f"(r, {k_out})"
            if not ok:
                problems.append(f"{key}: adapter has shape {shape}, the base kernel {np.shape(kernel)} needs {want}")
        elif key not in base:
            problems.append(f"{key}: no such leaf in the base")
        elif tuple(np.shape(base[key])) != shape:
            problems.append(f"{key}: adapter has shape {shape}, base has {tuple(np.shape(base[key]))}")
    if problems:
        raise AdapterMismatchError(
            "adapter does not fit this base model (was it trained on another one?):\n  " + "\n  ".join(problems[:10])
        )


def load_adapter(directory: str, base_params: Mapping | None = None) -> tuple[dict, LoraConfig, dict]:
    """-> (adapter tree of numpy arrays, LoraConfig, metadata). With base_params, checks shapes (error) and the
    fingerprint (warning)."""
    meta_path = os.path.join(directory, META)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(
            f"{directory} is not a complete lora_jax adapter (no {META}); it may be a partial save or another format "
            "(for a PEFT adapter use lora_jax.import_peft)"
        )
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory}: unknown adapter format {meta.get('format')!r} (expected {FORMAT!r})")
    config = LoraConfig.from_dict(meta["lora_config"])
    target = unflatten_tree(
        {tuple(k.split("/")): jax.ShapeDtypeStruct(tuple(v["shape"]), np.dtype(v["dtype"])) for k, v in meta["leaves"].items()}
    )
    try:
        restored = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(directory), "params"), target)
    except Exception as e:  # orbax raises many types for damaged files
        raise ValueError(f"adapter at {directory} is unreadable ({type(e).__name__}: {str(e)[:200]})") from e
    adapter = jax.tree_util.tree_map(np.asarray, restored)
    if base_params is not None:
        check_adapter_fits(adapter, base_params)
        fp = base_fingerprint(split_trainable(base_params, config)[1])
        if fp != meta["base_fingerprint"]:
            warnings.warn(
                f"adapter in {directory} was trained on base {meta['base_model']!r}, whose weights differ from the "
                "base given here (shapes match): outputs will not be what was trained"
            )
    return adapter, config, meta
