"""K adapters as one pure tree: `stack_adapters`, `unstack`, `replace_adapter`.

A stacked tree has the nesting of an adapter tree; every module that any of the K adapters adapts holds

    lora_a (K, in, r_max)   lora_b (K, r_max, out)   lora_scale (K,) float32

Adapter k's A and B sit in slot k, zero-padded from its own rank r_k to r_max; a module adapter k does not target has
zero A, B and scale. Zero padding adds exact zeros ((x @ [A, 0]) @ [B; 0] = (x @ A) @ B), so every slot computes
its own adapter's `scale_k * (x @ A_k) @ B_k` and nothing else. Slot 0 is the base model (all zeros) unless
`base_slot=False`. `StackInfo` (hashable, jit-static) records which name, config and modules each slot holds.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from lora_jax.lora.config import LoraConfig
from lora_jax.lora.transform import LORA_A, LORA_B, LORA_MAGNITUDE
from lora_jax.tree import flatten_tree, path_str, unflatten_tree

LORA_SCALE = "lora_scale"
# BART's Embed modules: an adapter there would be silently ignored by MultiLoraModel, which adapts nn.Dense calls.
EMBEDDING_MODULES = ("embed_tokens", "shared", "embed_positions")
BASE = ""  # the name of slot 0 when it holds the base model (and of empty slots)


class NoFreeSlotError(ValueError):
    """Every adapter slot of a stack is taken (callers that manage slots their own way reword it)."""


@dataclasses.dataclass(frozen=True)
class StackInfo:
    """What a stacked tree holds. names[k] / configs[k] / modules_of[k]: slot k's adapter name ("" for the base or an
    empty slot), LoraConfig (None for those) and the (module path, rank) pairs it adapts; modules: every stacked
    module path; rank: r_max; base_slot: whether slot 0 is the base model."""

    names: tuple[str, ...]
    configs: tuple[LoraConfig | None, ...]
    modules_of: tuple[tuple[tuple[str, int], ...], ...]
    modules: tuple[str, ...]
    rank: int
    base_slot: bool = True

    @property
    def num_slots(self) -> int:
        return len(self.names)

    def slot(self, name: str | None) -> int:
        """The slot of adapter `name`; None or "" is slot 0, the base (when the stack reserves it)."""
        key = BASE if name is None else name
        if key == BASE:
            if not self.base_slot:
                raise KeyError("this stack has no base slot (built with base_slot=False); name an adapter")
            return 0
        if key not in self.names:
            raise KeyError(f"no adapter named {name!r}; loaded: {sorted(n for n in self.names if n)}")
        return self.names.index(key)

    def ids(self, names) -> np.ndarray:
        """(B,) int32 slot ids for a list of adapter names (None or "" = the base)."""
        return np.asarray([self.slot(n) for n in names], np.int32)


def _adapter_modules(name: str, adapter: Mapping) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{module path: (A (in, r), B (r, out))} of one adapter tree; other leaves are refused."""
    flat = flatten_tree(adapter)
    other = sorted(path_str(p) for p in flat if p[-1] not in (LORA_A, LORA_B))
    if any(p[-1] == LORA_MAGNITUDE for p in flat):
        raise ValueError(f"adapter {name!r} is a DoRA adapter (lora_magnitude leaves): a stack serves plain low-rank "
                         "branches only, and serving it without its magnitudes would compute something else; merge it "
                         "into its own base (merge_lora) instead")
    if other:
        raise ValueError(
            f"adapter {name!r} holds leaves other than lora_a/lora_b ({other[:3]}, modules_to_save): a stack serves "
            "low-rank branches only; merge that adapter into its own base instead"
        )
    out = {}
    for path in [p for p in flat if p[-1] == LORA_A]:
        if path[-2] in EMBEDDING_MODULES:
            raise ValueError(f"adapter {name!r} adapts the embedding {path_str(path[:-1])}: a stack serves adapters on "
                             "Dense layers only (MultiLoraModel adds no branch to an embedding lookup); merge that "
                             "adapter into its own base instead")
        a, b = np.asarray(flat[path]), np.asarray(flat.get(path[:-1] + (LORA_B,)))
        if b.ndim != 2 or a.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(f"adapter {name!r}: {path_str(path[:-1])} has lora_a {a.shape}, lora_b {np.shape(b)}; "
                             "expected (in, r) and (r, out)")
        out[path_str(path[:-1])] = (a, b)
    return out


def _module_shapes(per_adapter: Mapping[str, Mapping], extra: Mapping[str, tuple[int, int]]) -> dict:
    """{module: (in, out)} over all adapters (and `extra`); adapters that disagree on a module's shape are refused."""
    shapes = dict(extra)
    for name, modules in per_adapter.items():
        for module, (a, b) in modules.items():
            shape = (a.shape[0], b.shape[1])
            if shapes.setdefault(module, shape) != shape:
                raise ValueError(f"adapter {name!r} has {module} of shape {shape} but another has {shapes[module]}: "
                                 "stacked adapters must be made for the same base model")
    return shapes


def _empty_stack(shapes: Mapping[str, tuple[int, int]], slots: int, rank: int, dtype) -> dict:
    return {m: {LORA_A: np.zeros((slots, i, rank), dtype), LORA_B: np.zeros((slots, rank, o), dtype),
                LORA_SCALE: np.zeros((slots,), np.float32)} for m, (i, o) in shapes.items()}


def _fill_slot(stack: dict, slot: int, name: str, modules: Mapping, config: LoraConfig, rank: int) -> None:
    for module, (a, b) in modules.items():
        if module not in stack:
            raise ValueError(f"adapter {name!r} adapts {module}, which this stack does not hold; build the stack with "
                             "that module (stack_adapters(..., extra_modules={path: (in, out)}))")
        if a.shape[1] > rank:
            raise ValueError(f"adapter {name!r} has rank {a.shape[1]} on {module}, above the stack's r_max {rank}; "
                             "build the stack with min_rank >= that rank")
        leaves = stack[module]
        leaves[LORA_A][slot, :, : a.shape[1]] = a
        leaves[LORA_B][slot, : b.shape[0], :] = b
        leaves[LORA_SCALE][slot] = config.scale_for(module)


def _ranks(modules: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted((m, int(a.shape[1])) for m, (a, _) in modules.items()))


def _to_tree(stack: Mapping[str, Mapping]) -> dict:
    flat = {tuple(m.split("/")) + (leaf,): jnp.asarray(v) for m, leaves in stack.items() for leaf, v in leaves.items()}
    return unflatten_tree(flat)


def stack_adapters(
    adapters: Mapping[str, Mapping],
    configs: Mapping[str, LoraConfig],
    *,
    base_slot: bool = True,
    min_rank: int = 1,
    empty_slots: int = 0,
    extra_modules: Mapping[str, tuple[int, int]] | None = None,
    dtype=np.float32,
) -> tuple[dict, StackInfo]:
    """{name: adapter tree}, {name: LoraConfig} -> (stacked tree, StackInfo); see the module docstring for leaves.

    Slots: [base (if base_slot)] + the adapters in the given order + `empty_slots` zero slots (room for
    `replace_adapter` without changing shapes). r_max = max(min_rank, every adapter's rank); `extra_modules`
    {path: (in, out)} adds modules no adapter adapts yet (zeros), for the same reason."""
    if set(adapters) != set(configs):
        raise ValueError(f"adapters {sorted(adapters)} and configs {sorted(configs)} must name the same adapters")
    if BASE in adapters:
        raise ValueError('"" is the base slot\'s name; give the adapter a non-empty name')
    per_adapter = {name: _adapter_modules(name, tree) for name, tree in adapters.items()}
    shapes = _module_shapes(per_adapter, extra_modules or {})
    rank = max([min_rank] + [a.shape[1] for mods in per_adapter.values() for a, _ in mods.values()])
    head = [(BASE, None, {})] if base_slot else []
    slots = head + [(n, configs[n], per_adapter[n]) for n in adapters] + [(BASE, None, {})] * empty_slots
    stack = _empty_stack(shapes, len(slots), rank, dtype)
    for k, (name, config, modules) in enumerate(slots):
        if config is not None:
            _fill_slot(stack, k, name, modules, config, rank)
    info = StackInfo(
        names=tuple(n for n, _, _ in slots), configs=tuple(c for _, c, _ in slots),
        modules_of=tuple(_ranks(m) for _, _, m in slots), modules=tuple(sorted(shapes)), rank=rank,
        base_slot=base_slot,
    )
    return _to_tree(stack), info


def replace_adapter(stacked: Mapping, info: StackInfo, name: str, adapter: Mapping, config: LoraConfig,
                    slot: int | None = None) -> tuple[dict, StackInfo]:
    """Puts adapter `name` into a slot (its own if loaded, else `slot`, else the first empty one); every leaf keeps its
    shape, so a program compiled for `stacked` runs the result without recompiling."""
    if not name:
        raise ValueError('"" is the base slot\'s name; give the adapter a non-empty name')
    if slot is None:
        free = [k for k, c in enumerate(info.configs) if c is None and not (info.base_slot and k == 0)]
        slot = info.names.index(name) if name in info.names else (free[0] if free else None)
    if slot is None:
        raise NoFreeSlotError(f"no free slot for adapter {name!r} (slots: {list(info.names)}); evict one with "
                         "replace_adapter(..., slot=k) or stack with more empty_slots")
    if not 0 <= slot < info.num_slots or (info.base_slot and slot == 0):
        first = int(info.base_slot)
        raise ValueError(f"slot {slot} is not an adapter slot of this stack ({first}..{info.num_slots - 1} are)")
    modules = _adapter_modules(name, adapter)
    stack = _cleared(stacked, slot)
    _fill_slot(stack, slot, name, modules, config, info.rank)
    return _to_tree(stack), _with_slot(info, slot, name, config, _ranks(modules))


def remove_adapter(stacked: Mapping, info: StackInfo, name: str) -> tuple[dict, StackInfo]:
    """Empties adapter `name`'s slot (zeros, name ""), keeping every shape."""
    slot = info.slot(name)
    if not name:
        raise ValueError("the base slot cannot be removed")
    return _to_tree(_cleared(stacked, slot)), _with_slot(info, slot, BASE, None, ())


def _cleared(stacked: Mapping, slot: int) -> dict[str, dict]:
    """The stacked leaves as writable host arrays {module: {leaf: array}}, with slot `slot` zeroed."""
    stack = {m: {leaf: np.array(v) for leaf, v in leaves.items()} for m, leaves in _by_module(stacked).items()}
    for leaves in stack.values():
        for leaf in leaves.values():
            leaf[slot] = 0
    return stack


def _with_slot(info: StackInfo, slot: int, name: str, config: LoraConfig | None, modules: tuple) -> StackInfo:
    names, configs, mods = list(info.names), list(info.configs), list(info.modules_of)
    names[slot], configs[slot], mods[slot] = name, config, modules
    return dataclasses.replace(info, names=tuple(names), configs=tuple(configs), modules_of=tuple(mods))


def _by_module(stacked: Mapping) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for path, v in flatten_tree(stacked).items():
        out.setdefault(path_str(path[:-1]), {})[path[-1]] = v
    return out


def unstack(stacked: Mapping, info: StackInfo) -> dict[str, dict]:
    """The inverse of stack_adapters: {name: adapter tree} with each adapter's own ranks and modules (the base and
    empty slots are left out)."""
    by_module = _by_module(stacked)
    out = {}
    for k, (name, config) in enumerate(zip(info.names, info.configs)):
        if config is None:
            continue
        flat = {}
        for module, r in info.modules_of[k]:
            base = tuple(module.split("/"))
            flat[base + (LORA_A,)] = jnp.asarray(by_module[module][LORA_A][k, :, :r])
            flat[base + (LORA_B,)] = jnp.asarray(by_module[module][LORA_B][k, :r, :])
        out[name] = unflatten_tree(flat)
    return out
