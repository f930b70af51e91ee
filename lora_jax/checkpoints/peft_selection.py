"""Which modules PEFT adapts: those target_modules selects, less what exclude_modules, modules_to_save and
layers_to_transform / layers_pattern take away (PEFT 0.21.2's `check_target_module_exists`, on dotted module names).

Weights of a module PEFT would not adapt are a contradiction (refused, or with trust_weights dropped as PEFT drops
them: it never wraps the module, so their keys go unused), and a module PEFT adapts must have weights
(`missing_targets`). When the config narrows its targets this way, the imported LoraConfig lists the adapted modules
exactly, so lora_jax's own matching (which has no exclusions) selects the same modules.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Mapping

from lora_jax.checkpoints.peft_weights import ALL_LINEAR
from lora_jax.lora.config import LoraConfig
from lora_jax.lora.transform import ADAPTER_LEAVES, LORA_A, kernel_modules
from lora_jax.tree import Path, path_str


def _strings(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def check_selection_fields(cfg: Mapping[str, Any]) -> None:
    """Types of exclude_modules, layers_to_transform, layers_pattern, and PEFT's own rules on combining them; a
    ValueError naming the key."""
    exclude, layers, pattern = cfg.get("exclude_modules"), cfg.get("layers_to_transform"), cfg.get("layers_pattern")
    if exclude is not None and not _strings(exclude):
        raise ValueError(f"adapter_config.json: exclude_modules must be a regex or a list of module names, got {exclude!r}")
    for key, value in (("exclude_modules", exclude), ("layers_pattern", pattern)):
        for regex in [value] if isinstance(value, str) else (value or []):
            try:
                re.compile(regex)
            except re.error as e:
                raise ValueError(f"adapter_config.json: {key} {regex!r} is not a valid regex ({e})") from None
    ints = isinstance(layers, int) and not isinstance(layers, bool) or (
        isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers))
    if layers is not None and not ints:
        raise ValueError(f"adapter_config.json: layers_to_transform must be a layer index or a list of them, got {layers!r}")
    if pattern is not None and not _strings(pattern):
        raise ValueError(f"adapter_config.json: layers_pattern must be a name or a list of names, got {pattern!r}")
    if layers is not None and isinstance(cfg.get("target_modules"), str):
        raise ValueError("adapter_config.json: layers_to_transform cannot be used with a regex target_modules (PEFT "
                         "refuses it too): put the layers in the regex")
    if pattern and layers is None:
        raise ValueError("adapter_config.json: layers_pattern is set without layers_to_transform (PEFT refuses it too)")


def _layer_index(name: str, pattern: Any) -> int | None:
    """The layer index in a dotted module name, as PEFT finds it: the first numbered segment (after `pattern`)."""
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def deselected_by(cfg: Mapping[str, Any], module: str) -> str | None:
    """The field that keeps PEFT from adapting the '/'-joined `module` although target_modules selects it (None if
    none does)."""
    name = module.replace("/", ".")
    exclude = cfg.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(exclude, name):
        return "exclude_modules"
    if isinstance(exclude, list) and any(name == e or name.endswith("." + e) for e in exclude):
        return "exclude_modules"
    if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in cfg.get("modules_to_save") or ()):
        return "modules_to_save"  # PEFT never adapts a module it saves in full
    layers, targets = cfg.get("layers_to_transform"), cfg.get("target_modules")
    using_layers = layers is not None and (layers != [] if isinstance(layers, list) else True)
    if using_layers and isinstance(targets, list) and name not in targets:
        index = _layer_index(name, cfg.get("layers_pattern"))
        if index is None or (index != layers if isinstance(layers, int) else index not in layers):
            return "layers_to_transform"
    return None


def narrows_targets(cfg: Mapping[str, Any]) -> bool:
    """Whether the config takes modules away from target_modules (then targets are taken from the weights)."""
    layers = cfg.get("layers_to_transform")
    return bool(cfg.get("exclude_modules")) or (layers is not None and layers != [])


def drop_deselected(cfg: Mapping[str, Any], flat: Mapping[Path, Any], keys: Mapping[Path, str],
                    source: str | None) -> tuple[dict, dict, bool]:
    """(`flat`, `keys` without the adapter weights of modules PEFT would not adapt, whether any were dropped). With a
    `source` (strict) such weights are a ValueError naming the first key and the field instead."""
    dropped = {p: deselected_by(cfg, path_str(p[:-1])) for p in flat if p[-1] in ADAPTER_LEAVES}
    dropped = {p: field for p, field in dropped.items() if field}
    if not dropped:
        return dict(flat), dict(keys), False
    first = min(dropped, key=lambda p: keys[p])
    modules = sorted({path_str(p[:-1]) for p in dropped})
    if source is not None:
        raise ValueError(f"PEFT config contradicts its weights: {keys[first]}: {dropped[first]} in {source} keeps PEFT "
                         f"from adapting {path_str(first[:-1])} ({len(modules)} such modules), so PEFT would not apply "
                         f"these weights. Fix {source}, or pass trust_weights=True to load it as PEFT does, without them")
    warnings.warn(f"PEFT adapter: {sorted(set(dropped.values()))} keep PEFT from adapting {modules[:3]} ({len(modules)} "
                  "modules) that have weights; dropping those weights, as PEFT does")
    return ({p: v for p, v in flat.items() if p not in dropped}, {p: k for p, k in keys.items() if p not in dropped},
            True)


def missing_targets(config: LoraConfig, cfg: Mapping[str, Any], flat: Mapping[Path, Any], base_params: Mapping) -> list[str]:
    """Modules of the base that PEFT would adapt (`config` targets them, nothing deselects them) but the weights do
    not: PEFT would wrap them and leave them at their initial values."""
    if ALL_LINEAR in config.targets:
        return []
    adapted = {path_str(p[:-1]) for p in flat if p[-1] == LORA_A}
    candidates = [m for m, shape in kernel_modules(base_params).items() if len(shape) == 2]
    return sorted(m for m in candidates if config.is_target(m) and m not in adapted and not deselected_by(cfg, m))
