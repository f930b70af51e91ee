"""Paths into nested parameter trees: the one way this package flattens and unflattens them.

A path is a tuple of keys, ("model", "encoder", "layers", "0", "fc1", "kernel"); its string form joins the keys with
'/'. Flax `FrozenDict`s are unfrozen first, so every caller sees plain dicts.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util
from flax.core import FrozenDict, unfreeze

Path = tuple[str, ...]


def flatten_tree(tree: Mapping) -> dict[Path, Any]:
    """{path tuple: leaf} of a nested dict (or FrozenDict) tree."""
    if isinstance(tree, FrozenDict):
        tree = unfreeze(tree)
    return traverse_util.flatten_dict(dict(tree))


def unflatten_tree(flat: Mapping[Path, Any]) -> dict:
    """The nested plain-dict tree of {path tuple: leaf}."""
    return traverse_util.unflatten_dict(dict(flat))


def merge_trees(base: Mapping, overlay: Mapping) -> dict:
    """Deep-merges `overlay` into `base` (a new nested dict; overlay's leaves win where both have a path)."""
    flat = flatten_tree(base)
    flat.update(flatten_tree(overlay))
    return unflatten_tree(flat)


def path_str(path: Path) -> str:
    return "/".join(str(p) for p in path)


def flatten_paths(tree: Mapping) -> dict[str, Any]:
    """{'/'-joined path: leaf} of a nested params-like tree."""
    return {path_str(k): v for k, v in flatten_tree(tree).items()}


def tree_bytes(tree: Any) -> int:
    """Bytes held by the arrays of a pytree (arrays or jax.ShapeDtypeStructs; structured leaves count their arrays)."""
    return int(sum(np.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)
                   if hasattr(x, "dtype")))
