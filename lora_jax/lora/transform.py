"""LoRA as pure functions over parameter trees: add adapters, split/combine, merge/unmerge, count.

A LoRA tree is the base tree where each targeted Dense dict `{kernel (in, out), bias}` also holds
`lora_a (in, r)` and `lora_b (r, out)` (an Embed dict `{embedding (vocab, features)}`: `lora_a (vocab, r)`,
`lora_b (r, features)`). An adapter tree has the same nesting but only the adapter leaves and the
`modules_to_save` leaves. Trees are plain nested dicts; leaves that are not changed are the same objects.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from lora_jax.lora import dora
from lora_jax.lora.config import LoraConfig, path_matches
from lora_jax.lora.leaves import ADAPTER_LEAVES, LORA_A, LORA_B, LORA_MAGNITUDE
from lora_jax.lora.residual_init import residual_adapters
from lora_jax.quantization import dequantize
from lora_jax.tree import Path, flatten_tree, merge_trees, path_str, unflatten_tree

# The weight leaves an adapter can sit beside: a Dense `kernel (in, out)` or an Embed `embedding (vocab, features)`
# (the adapter then adds scale·A[ids]@B to the looked-up rows: A is (vocab, r), B (r, features)).
WEIGHT_LEAVES = ("kernel", "embedding")


def kernel_modules(params: Mapping) -> dict[str, tuple[int, ...]]:
    """{module path: weight shape} for every module holding a `kernel` or `embedding` leaf."""
    return {path_str(p[:-1]): tuple(np.shape(v)) for p, v in flatten_tree(params).items() if p[-1] in WEIGHT_LEAVES}


def weight_path(flat: Mapping[Path, Any], module: Path) -> Path:
    """The path of the weight leaf (`kernel` or `embedding`) of `module` in a flat tree; KeyError naming it if none."""
    for leaf in WEIGHT_LEAVES:
        if module + (leaf,) in flat:
            return module + (leaf,)
    raise KeyError(f"{path_str(module)} has no kernel or embedding leaf for its LoRA adapter to adapt")


def _module_paths(flat: Mapping[Path, Any]) -> set[str]:
    return {path_str(p[:i]) for p in flat for i in range(1, len(p) + 1)}


def target_modules(params: Mapping, config: LoraConfig) -> list[str]:
    """The module paths `config.targets` selects; raises a ValueError naming the problem for a target that matches no
    2-D kernel or embedding (listing the candidates) or that matches something else."""
    flat = flatten_tree(params)
    kernels = kernel_modules(params)
    candidates = sorted(p for p, s in kernels.items() if len(s) == 2)
    chosen = [p for p in candidates if config.is_target(p)]
    for pattern in config.targets:
        if any(path_matches(pattern, p) for p in candidates):
            continue
        others = sorted(p for p in _module_paths(flat) if path_matches(pattern, p))
        if others:
            depth = len(others[0].split("/"))
            what = {path_str(k[depth:]) or "a leaf": np.shape(v) for k, v in flat.items() if path_str(k[:depth]) == others[0]}
            raise ValueError(
                f"LoRA target {pattern!r} matches {others[0]!r}, which is not a module with a 2-D kernel or embedding "
                f"(it holds {what}); LoRA adapts Dense kernels and Embed tables only — use modules_to_save to train it "
                "in full."
            )
        names = sorted({p.rsplit("/", 1)[-1] for p in candidates})
        raise ValueError(
            f"LoRA target {pattern!r} matches no module with a 2-D kernel or embedding. Module names: {names}; "
            f"full paths look like {candidates[:3]} (of {len(candidates)})."
        )
    return chosen


def _saved_leaf(path: Path, config: LoraConfig | None) -> bool:
    if config is None or not config.modules_to_save or path[-1] in ADAPTER_LEAVES:
        return False
    return any(config.is_saved_module(path_str(path[:i])) for i in range(1, len(path) + 1))


def _check_modules_to_save(flat: Mapping[Path, Any], config: LoraConfig) -> None:
    paths = _module_paths(flat)
    for pattern in config.modules_to_save:
        if not any(path_matches(pattern, p) for p in paths):
            tops = sorted({path_str(p[:2]) for p in flat})
            raise ValueError(f"modules_to_save entry {pattern!r} matches nothing in the params; top-level paths: {tops}")


def _init_a(rng, shape, rank, init, dtype):
    if init == "gaussian":
        return (jax.random.normal(rng, shape, jnp.float32) / rank).astype(dtype)
    # PEFT: kaiming_uniform_(a=sqrt(5)) on the (r, in) weight -> U(-1/sqrt(in), 1/sqrt(in)).
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(rng, shape, jnp.float32, -bound, bound).astype(dtype)


def _check_variant_targets(flat: Mapping[Path, Any], modules: list[str], config: LoraConfig) -> None:
    """DoRA and the residual inits need a plain (unquantised) Dense kernel under every target."""
    if not (config.use_dora or config.residual_init):
        return
    variant = "use_dora" if config.use_dora else f"init={config.init!r}"
    for module in modules:
        kernel = flat.get(tuple(module.split("/")) + ("kernel",))
        if kernel is None:
            raise ValueError(f"LoraConfig {variant} adapts Dense kernels only, but target {module!r} is an embedding")
        if config.residual_init and not isinstance(kernel, (jax.Array, np.ndarray)):
            raise ValueError(f"LoraConfig {variant} needs a plain kernel at {module!r}, which is quantised: a residual "
                             "init rewrites the base kernel; initialise before quantising, or use init='gaussian'")


def init_lora(params: Mapping, config: LoraConfig, rng: jax.Array, adapter_dtype: Any = jnp.float32) -> dict:
    """Adds `lora_a (in, r)` and `lora_b (r, out)` beside every targeted kernel (B zeros; with a residual init
    (PiSSA / OLoRA) both from W's decomposition and the kernel replaced by its residual), and with DoRA
    `lora_magnitude (out,)` = the column norms of W + scale·A@B. The adapted model computes what the base computes.
    Untouched leaves are the same objects as in `params`; the input tree is not modified."""
    flat = flatten_tree(params)
    if any(p[-1] in ADAPTER_LEAVES for p in flat):
        raise ValueError("params already hold LoRA adapters; merge_lora(params, config) or start from the base params")
    modules = target_modules(params, config)
    _check_modules_to_save(flat, config)
    _check_variant_targets(flat, modules, config)
    if config.residual_init:
        flat = flatten_tree(residual_adapters(params, config, modules, rng))
    else:
        for key, module in zip(jax.random.split(rng, max(len(modules), 1)), modules):
            base = tuple(module.split("/"))
            d_in, d_out = np.shape(flat[weight_path(flat, base)])
            r = config.rank_for(module)
            flat[base + (LORA_A,)] = _init_a(key, (d_in, r), r, config.init, adapter_dtype)
            flat[base + (LORA_B,)] = jnp.zeros((r, d_out), adapter_dtype)
    for module in modules if config.use_dora else ():
        path = tuple(module.split("/"))
        flat[path + (LORA_MAGNITUDE,)] = dora.column_norms(
            flat[path + ("kernel",)], flat[path + (LORA_A,)], flat[path + (LORA_B,)], config.scale_for(module))
    return unflatten_tree({p: v.astype(adapter_dtype) if p[-1] in ADAPTER_LEAVES else v for p, v in flat.items()})


def is_trainable(path: Path, config: LoraConfig | None, full_finetune: bool = False) -> bool:
    """Adapter leaves and modules_to_save leaves train; with full_finetune every leaf does."""
    return full_finetune or path[-1] in ADAPTER_LEAVES or _saved_leaf(path, config)


def split_trainable(params: Mapping, config: LoraConfig | None, full_finetune: bool = False) -> tuple[dict, dict]:
    """params -> (trainable, frozen): two disjoint nested dicts that `combine` puts back together."""
    flat = flatten_tree(params)
    train = {p: v for p, v in flat.items() if is_trainable(p, config, full_finetune)}
    frozen = {p: v for p, v in flat.items() if p not in train}
    return unflatten_tree(train), unflatten_tree(frozen)


def adapter_params(params: Mapping, config: LoraConfig | None = None) -> dict:
    """Only the `lora_a`/`lora_b` leaves and (given `config`) the modules_to_save leaves, nested as in `params`."""
    return split_trainable(params, config)[0]


def combine(base: Mapping, adapter: Mapping) -> dict:
    """Deep-merges `adapter` into `base` (adapter leaves win)."""
    return merge_trees(base, adapter)


def _delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    return scale * (jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32))


def merge_lora(params: Mapping, config: LoraConfig) -> dict:
    """W' = W + scale·A@B for every adapted kernel (with DoRA, W' = m·(W + scale·A@B)/||W + scale·A@B||), computed in
    float32 and cast once to the kernel's dtype; adapter leaves removed, so the result has exactly the base model's tree.
    On a quantised base (`quantize_base`) every quantised kernel is dequantised (to the dtype it had before
    quantisation): the result is a plain tree."""
    flat = flatten_tree(params)
    out = {p: dequantize(v) for p, v in flat.items() if p[-1] not in ADAPTER_LEAVES}
    for path in [p for p in flat if p[-1] == LORA_A]:
        module = path[:-1]
        weight = weight_path(flat, module)
        a, b, scale = flat[path], flat[module + (LORA_B,)], config.scale_for(path_str(module))
        if module + (LORA_MAGNITUDE,) in flat:
            out[weight] = dora.merged_kernel(flat[weight], a, b, flat[module + (LORA_MAGNITUDE,)], scale)
        else:
            out[weight] = (dequantize(flat[weight], jnp.float32) + _delta(a, b, scale)).astype(flat[weight].dtype)
    return unflatten_tree(out)


def unmerge_lora(merged: Mapping, adapter: Mapping, config: LoraConfig) -> dict:
    """Inverse of merge_lora: W = W' - scale·A@B, with the adapter (and modules_to_save) leaves put back."""
    flat = flatten_tree(merged)
    adapter_flat = flatten_tree(adapter)
    if any(p[-1] == LORA_MAGNITUDE for p in adapter_flat):
        raise ValueError("a DoRA merge cannot be undone from the merged kernels: the column norms of W + scale·A@B "
                         "it divided by are gone; keep the base params and combine(base, adapter) instead")
    for path in [p for p in adapter_flat if p[-1] == LORA_A]:
        module = path[:-1]
        weight = weight_path(flat, module)
        delta = _delta(adapter_flat[path], adapter_flat[module + (LORA_B,)], config.scale_for(path_str(module)))
        flat[weight] = (jnp.asarray(flat[weight], jnp.float32) - delta).astype(flat[weight].dtype)
    flat.update(adapter_flat)
    return unflatten_tree(flat)


def count_params(params: Mapping, config: LoraConfig | None = None, full_finetune: bool = False, verbose: bool = True):
    """(trainable, total, percent) like PEFT's `print_trainable_parameters` (total = base + adapter)."""
    flat = flatten_tree(params)
    total = sum(int(np.prod(np.shape(v))) for v in flat.values())
    trainable = sum(int(np.prod(np.shape(v))) for p, v in flat.items() if is_trainable(p, config, full_finetune))
    percent = 100.0 * trainable / max(total, 1)
    if verbose:
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}")
    return trainable, total, percent
