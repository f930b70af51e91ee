"""PEFT's rank_pattern / alpha_pattern, resolved as PEFT resolves them.

PEFT (0.21, `peft.utils.other.get_pattern_key`) gives a module the value of the first key k, in the config's order,
for which `re.match(rf"(.*\\.)?({k})$", name)` holds on the module's dotted name ("model.encoder.layers.0.fc1").
lora_jax matches its patterns against '/'-joined paths, and a PEFT key read with '\\.' as '/' mostly means the same,
but not always: `[^.]+` spans a '/' but never a '.', an unescaped '.' matches a separator in both. So on import the
value PEFT would give each adapted module is computed on its dotted name, and where the '/'-reading of the keys would
give any module another value, the patterns are replaced by one exact entry per module.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping, Sequence

from lora_jax.lora.config import LoraConfig


def peft_pattern_key(keys: Sequence[str], name: str) -> str | None:
    """The first of `keys` PEFT would apply to the module with dotted `name`, or None (PEFT then uses r / lora_alpha)."""
    return next((k for k in keys if re.match(rf"(.*\.)?({k})$", name)), None)


def _peft_values(pattern: Mapping[str, Any], default: Any, modules: Iterable[str]) -> dict[str, Any]:
    """{module path ('/'-joined): PEFT's value for it}."""
    out = {}
    for module in modules:
        key = peft_pattern_key(list(pattern), module.replace("/", "."))
        out[module] = default if key is None else pattern[key]
    return out


def resolve_peft_patterns(config: LoraConfig, peft_cfg: Mapping[str, Any], modules: Iterable[str]) -> LoraConfig:
    """`config` (from `lora_config_from_peft`) with rank_pattern / alpha_pattern that give each module in `modules`
    ('/'-joined adapted module paths) the rank and alpha PEFT gives it under `peft_cfg` (adapter_config.json)."""
    modules = sorted(modules)
    fields = {}
    for field, peft_field, default, lookup, cast in (
        ("rank_pattern", "rank_pattern", config.rank, config.rank_for, int),
        ("alpha_pattern", "alpha_pattern", config.alpha, config.alpha_for, float),
    ):
        want = _peft_values(peft_cfg.get(peft_field) or {}, default, modules)
        if any(lookup(m) != cast(v) for m, v in want.items()):
            # An exact path matches only its own module (our module names hold no regex metacharacters).
            fields[field] = tuple((re.escape(m), cast(v)) for m, v in want.items() if cast(v) != default)
    return dataclasses.replace(config, **fields) if fields else config
