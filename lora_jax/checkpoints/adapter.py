"""Adapter-only checkpoints: the LoRA (and modules_to_save) leaves with Orbax, plus JSON metadata.

Layout of an adapter directory:
    params/            Orbax StandardCheckpointer tree of the adapter leaves (nested like the params)
    adapter_meta.json  {"format", "lora_config", "base_model", "base_fingerprint", "leaves": {path: shape},
                        "files": {path under params/: {"bytes", "sha256"}}}

Loading checks the files against their recorded sizes and digests before Orbax reads them, so a truncated or
bit-flipped adapter is reported as damaged (naming the file) instead of loading wrong numbers or failing deep in
TensorStore. Adapters saved before digests were recorded are read by Orbax directly.

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
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lora_jax.training import orbax_reads
from lora_jax.checkpoints.files import damaged_files, file_digests
from lora_jax.lora.config import LoraConfig
from lora_jax.quantization import dequantize
from lora_jax.lora.transform import ADAPTER_LEAVES, LORA_A, LORA_MAGNITUDE, adapter_params, split_trainable
from lora_jax.models.tying import LM_HEAD, SHARED, UNTIED_LEAVES
from lora_jax.tree import flatten_paths, path_str, unflatten_tree

META = "adapter_meta.json"
FORMAT = "lora_jax.adapter/1"


class AdapterMismatchError(ValueError):
    """An adapter whose leaves do not fit the base parameters it is loaded onto."""


class AdapterDamagedError(ValueError):
    """An adapter directory whose metadata or leaf files are unreadable or differ from what was saved."""


FINGERPRINT_METHOD = "leaf-checksum/1"


@jax.jit
def leaf_checksum(x: jax.Array) -> jax.Array:
    """A uint32 checksum of every element of `x`: sum_i bits(x_i) * (2i + 1) mod 2**32, over the float32 bit patterns.
    Any single changed element changes it (an odd multiplier is invertible mod 2**32), and so does moving values
    around; one fused pass over the array and a scalar out, so it works on sharded arrays without gathering them."""
    bits = jax.lax.bitcast_convert_type(jnp.ravel(x).astype(jnp.float32), jnp.uint32)
    weights = jax.lax.iota(jnp.uint32, bits.size) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


def _array_leaves(flat: Mapping[str, Any]) -> dict[str, Any]:
    """`flat` with each structured leaf (a quantised kernel: codes, scales, ...) replaced by its arrays, `path[i]`."""
    out = {}
    for key, value in flat.items():
        parts = jax.tree_util.tree_leaves(value)
        if len(parts) == 1 and parts[0] is value:
            out[key] = value
        else:
            out.update({f"{key}[{i}]": part for i, part in enumerate(parts)})
    return out


def base_fingerprint(base_params: Mapping) -> dict:
    """A fingerprint of the frozen base: SHA-256 of the leaf shapes, and SHA-256 over (path, shape, `leaf_checksum`)
    of every leaf (adapters excluded), so a change to any element of any frozen weight changes `values_sha256`.

    Every element is read once on its device (bart-large, 406M parameters: see README); only the scalar checksums
    come to the host, so sharded leaves are never gathered. Values are compared as float32 (bf16 leaves are exact)."""
    flat = _array_leaves({k: v for k, v in flatten_paths(base_params).items() if k.rsplit("/", 1)[-1] not in ADAPTER_LEAVES})
    shapes = {k: list(np.shape(v)) for k, v in sorted(flat.items())}
    sums = jax.device_get({k: leaf_checksum(v) for k, v in flat.items()})
    digest = hashlib.sha256()
    for key in sorted(flat):
        digest.update(f"{key}{shapes[key]}{int(sums[key])};".encode())
    return {"method": FINGERPRINT_METHOD, "shapes_sha256": hashlib.sha256(json.dumps(shapes).encode()).hexdigest(),
            "values_sha256": digest.hexdigest(), "num_leaves": len(flat)}


def legacy_fingerprint(base_params: Mapping) -> dict:
    """The fingerprint adapters saved before FINGERPRINT_METHOD carry (first 8 rows of 2 kernels and 1 embedding),
    kept only to check those adapters."""
    flat = {k: v for k, v in flatten_paths(base_params).items() if k.rsplit("/", 1)[-1] not in ADAPTER_LEAVES}
    shapes = {k: list(np.shape(v)) for k, v in sorted(flat.items())}
    digest = hashlib.sha256()
    kernels = [k for k in sorted(flat) if k.endswith("/kernel")][:2]
    embeddings = [k for k in sorted(flat) if k.endswith("/embedding")][:1]
    for key in kernels + embeddings:
        digest.update(key.encode())
        values = jax.device_get(dequantize(flat[key]))  # a quantised base is fingerprinted by what it computes with
        digest.update(np.ascontiguousarray(np.asarray(values, np.float32)[:8]).tobytes())
    return {"shapes_sha256": hashlib.sha256(json.dumps(shapes).encode()).hexdigest(), "values_sha256": digest.hexdigest(),
            "num_leaves": len(flat)}


def check_fingerprint(directory: str, meta: Mapping, base: Mapping) -> None:
    """Warns when the frozen `base` is not the one the adapter's metadata fingerprinted (by that fingerprint's own
    method: an adapter saved before FINGERPRINT_METHOD is checked the old way, which sees fewer changes, and says so)."""
    saved = meta.get("base_fingerprint") or {}
    method = saved.get("method")
    if method not in (None, FINGERPRINT_METHOD):
        warnings.warn(f"adapter in {directory} has a base fingerprint of unknown method {method!r}: base not verified")
        return
    if method is None:
        warnings.warn(f"adapter in {directory} was saved with the old base fingerprint (a few rows of 3 tensors): "
                      "checking the base that way only; save it again to get a fingerprint of every weight")
    current = base_fingerprint(base) if method else legacy_fingerprint(base)
    if current != saved:
        warnings.warn(
            f"adapter in {directory} was trained on base {meta.get('base_model')!r}, whose weights differ from the "
            "base given here (shapes match): outputs will not be what was trained"
        )


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
    tmp, main = _saving_dir(directory), jax.process_index() == 0
    try:
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(os.path.join(tmp, "params"), adapter)  # several processes: each joins Orbax's collective save
        ckpt.wait_until_finished()
        if not main:  # process 0 writes the plain files and renames the directory into place
            _barrier(f"lora_jax.save_adapter.done:{directory}")
            return directory
        meta["files"] = file_digests(os.path.join(tmp, "params"))
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
    _barrier(f"lora_jax.save_adapter.done:{directory}")
    return directory


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _saving_dir(directory: str) -> str:
    """A fresh temporary sibling of `directory` to write into; in a multi-process job the same path on every process
    (process 0 clears it first)."""
    parent, name = os.path.dirname(directory), os.path.basename(directory)
    if jax.process_count() == 1:
        return tempfile.mkdtemp(prefix=f".{name}.tmp", dir=parent)
    tmp = os.path.join(parent, f".{name}.tmp-multiprocess")
    if jax.process_index() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier(f"lora_jax.save_adapter.start:{directory}")
    return tmp


UNTIED_KEYS = {path_str(p) for p in UNTIED_LEAVES}
SHARED_KEY = path_str(SHARED)


def _fits_untied_slot(key: str, shape: tuple[int, ...], base: Mapping) -> bool:
    """True when `key` is an untied leaf (lm_head/kernel (D, V), .../embed_tokens/embedding (V, D)) of the shape the
    base's shared embedding (V, D) implies."""
    if key not in UNTIED_KEYS or SHARED_KEY not in base:
        return False
    vocab_by_dim = tuple(np.shape(base[SHARED_KEY]))
    return shape == (vocab_by_dim[::-1] if key == path_str(LM_HEAD) else vocab_by_dim)


def _untie_hint(module: str, base: Mapping) -> str:
    if module + "/embedding" in UNTIED_KEYS and SHARED_KEY in base:
        return " (the base is tied: untie it first, base = lora_jax.untie_embeddings(base))"
    return ""


def check_adapter_fits(adapter: Mapping, base_params: Mapping) -> None:
    """Raises AdapterMismatchError naming the first leaf whose shape does not fit the base (lora_a must be
    (kernel_in, r), lora_b (r, kernel_out), a modules_to_save leaf the base leaf's shape)."""
    base = flatten_paths(base_params)
    problems = []
    for key, value in flatten_paths(adapter).items():
        module, _, leaf = key.rpartition("/")
        shape = tuple(np.shape(value))
        if leaf in ADAPTER_LEAVES:
            kernel = base.get(module + "/kernel", base.get(module + "/embedding"))
            if kernel is None:
                problems.append(f"{key}: the base has no kernel (or embedding) at {module}{_untie_hint(module, base)}")
                continue
            k_in, k_out = np.shape(kernel)
            if leaf == LORA_MAGNITUDE:
                ok, want = shape == (k_out,), f"({k_out},)"
            else:
                ok = len(shape) == 2 and (shape[0] == k_in if leaf == LORA_A else shape[1] == k_out)
                want = f"({k_in}, r)" if leaf == LORA_A else f"(r, {k_out})"
            if not ok:
                problems.append(f"{key}: adapter has shape {shape}, the base kernel {np.shape(kernel)} needs {want}")
        elif key not in base and _fits_untied_slot(key, shape, base):
            continue  # a head / token embedding of its own on a tied base: the model reads it in place of the shared one
        elif key not in base:
            problems.append(f"{key}: no such leaf in the base")
        elif tuple(np.shape(base[key])) != shape:
            problems.append(f"{key}: adapter has shape {shape}, base has {tuple(np.shape(base[key]))}")
    if problems:
        raise AdapterMismatchError(
            "adapter does not fit this base model (was it trained on another one?):\n  " + "\n  ".join(problems[:10])
        )


def _read_meta(directory: str) -> dict:
    """adapter_meta.json of `directory`, checked to be a JSON object of this format; errors name the file."""
    meta_path = os.path.join(directory, META)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(
            f"{directory} is not a complete lora_jax adapter (no {META}); it may be a partial save or another format "
            "(for a PEFT adapter use lora_jax.import_peft)"
        )
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f"{e.msg} at line {e.lineno}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise AdapterDamagedError(f"{meta_path} is not valid JSON ({where}): the adapter's metadata is damaged; "
                                  "save or export the adapter again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{meta_path}: unknown adapter format {found!r} (expected {FORMAT!r})")
    return meta


def _config_and_target(meta: dict, meta_path: str) -> tuple[LoraConfig, dict]:
    """(LoraConfig, tree of ShapeDtypeStructs to restore into) from the metadata; errors name the file."""
    try:
        config = LoraConfig.from_dict(meta["lora_config"])
        leaves = {tuple(k.split("/")): jax.ShapeDtypeStruct(tuple(v["shape"]), np.dtype(v["dtype"]))
                  for k, v in meta["leaves"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise AdapterDamagedError(f"{meta_path} is damaged or incomplete ({type(e).__name__}: {e}); "
                                  "save or export the adapter again") from None
    return config, unflatten_tree(leaves)


def load_adapter(directory: str, base_params: Mapping | None = None) -> tuple[dict, LoraConfig, dict]:
    """-> (adapter tree of numpy arrays, LoraConfig, metadata). With base_params, checks shapes (error) and the
    fingerprint (warning). A damaged adapter (metadata, truncated or altered leaf files) raises AdapterDamagedError
    naming the file."""
    meta = _read_meta(directory)
    config, target = _config_and_target(meta, os.path.join(directory, META))
    params_dir = os.path.join(os.path.abspath(directory), "params")
    problems = damaged_files(params_dir, meta.get("files", {}))
    if problems:
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        raise AdapterDamagedError(f"adapter at {directory} is damaged: params/{'; params/'.join(problems[:2])}{more}; "
                                  "save or export the adapter again")
    try:
        restored = orbax_reads.restore(params_dir, target)
    except Exception as e:  # orbax and tensorstore raise many types for damaged files
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise AdapterDamagedError(f"adapter at {directory} is unreadable ({type(e).__name__}: {first_line[:200]})") from e
    adapter = jax.tree_util.tree_map(np.asarray, restored)
    if base_params is not None:
        check_adapter_fits(adapter, base_params)
        check_fingerprint(directory, meta, split_trainable(base_params, config)[1])
    return adapter, config, meta
