"""A PEFT adapter's config checked against its weights, which are the truth of what the adapter does.

A hand-edited or mismatched `adapter_config.json` (r=8 over rank-16 weights, target_modules that do not name the
adapted modules, modules_to_save without weights) would import without error and compute something else, or write
metadata that lies about the adapter. `reconcile_config` finds every such contradiction and either raises naming the
first key, or (trusting the weights) rebuilds ranks, targets and modules_to_save from the weights with a warning.
Modules PEFT would not adapt (exclude_modules, layers_to_transform) are `peft_selection`'s.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings
from typing import Any, Mapping

from lora_jax.lora.config import LoraConfig, path_matches
from lora_jax.lora.transform import ADAPTER_LEAVES, LORA_A, LORA_B
from lora_jax.tree import Path, path_str

# PEFT's target_modules shorthand for "every Linear layer but the output head"; the weights say which ones.
ALL_LINEAR = "all-linear"


def adapted_ranks(flat: Mapping[Path, Any], keys: Mapping[Path, str]) -> dict[str, int]:
    """{module path: rank} of every adapted module (lora_a (in, r) / lora_b (r, out)); a ValueError naming the key
    when an A has no B or their ranks differ."""
    ranks = {}
    for path in (p for p in flat if p[-1] == LORA_A):
        b_path = path[:-1] + (LORA_B,)
        r = flat[path].shape[1]
        if b_path not in flat or flat[b_path].shape[0] != r:
            got = "no lora_B" if b_path not in flat else f"lora_B of rank {flat[b_path].shape[0]}"
            raise ValueError(f"{keys[path]} has rank {r} but its module has {got}: the adapter file is damaged")
        ranks[path_str(path[:-1])] = r
    if any(p[-1] == LORA_B and p[:-1] + (LORA_A,) not in flat for p in flat):
        key = next(keys[p] for p in flat if p[-1] == LORA_B and p[:-1] + (LORA_A,) not in flat)
        raise ValueError(f"{key} has no lora_A beside it: the adapter file is damaged")
    return ranks


def contradictions(config: LoraConfig, flat: Mapping[Path, Any], keys: Mapping[Path, str], source: str) -> list[str]:
    """Each way `config` contradicts the weights, as a message naming the key (or the config entry)."""
    ranks = adapted_ranks(flat, keys)
    key_of = {path_str(p[:-1]): keys[p] for p in flat if p[-1] == LORA_A}
    problems = []
    for module, r in sorted(ranks.items()):
        if ALL_LINEAR not in config.targets and not config.is_target(module):
            problems.append(f"{key_of[module]}: the weights adapt {module}, which target_modules {list(config.targets)} "
                            f"in {source} does not select")
        elif config.rank_for(module) != r:
            problems.append(f"{key_of[module]}: the weights have rank {r}, but {source} gives {module} "
                            f"r={config.rank_for(module)} (scale alpha/r would be wrong)")
    for target in config.targets:
        if target != ALL_LINEAR and not any(path_matches(target, m) for m in ranks):
            problems.append(f"target_modules entry {target!r} in {source} matches no adapter weight "
                            f"(adapted modules: {sorted(ranks)[:4]}...)")
    saved = sorted({path_str(p[:-1]) for p in flat if p[-1] not in ADAPTER_LEAVES})
    for module in saved:
        if not config.is_saved_module(module):
            key = next(keys[p] for p in flat if path_str(p[:-1]) == module)
            problems.append(f"{key}: a full weight of {module}, which modules_to_save {list(config.modules_to_save)} "
                            f"in {source} does not name")
    for name in config.modules_to_save:
        if not any(path_matches(name, m) for m in saved):
            problems.append(f"modules_to_save entry {name!r} in {source} has no weights in the adapter file")
    return problems


def config_from_weights(config: LoraConfig, flat: Mapping[Path, Any], keys: Mapping[Path, str]) -> LoraConfig:
    """`config` with targets, ranks and modules_to_save taken from the weights (exact module paths); alpha, its
    patterns, dropout and the rest are kept. The rank most modules have becomes `rank`, the others a rank_pattern."""
    ranks = adapted_ranks(flat, keys)
    rank = collections.Counter(ranks.values()).most_common(1)[0][0]
    saved = sorted({path_str(p[:-1]) for p in flat if p[-1] not in ADAPTER_LEAVES})
    return dataclasses.replace(
        config,
        rank=rank,
        targets=tuple(sorted(ranks)),
        rank_pattern={m: r for m, r in sorted(ranks.items()) if r != rank},
        modules_to_save=tuple(saved),
    )


def reconcile_config(config: LoraConfig, flat: Mapping[Path, Any], keys: Mapping[Path, str], source: str | None) -> LoraConfig:
    """The config that describes the weights `flat` ({path: our leaf}, `keys` {path: PEFT key}).

    source: the config file's name, to refuse any contradiction with a ValueError naming the key; None to trust the
    weights (ranks, targets and modules_to_save rebuilt from them) and warn about each contradiction."""
    if not any(p[-1] == LORA_A for p in flat):
        raise ValueError(f"the adapter has no lora_A weights: keys look like {sorted(keys.values())[:3]}")
    problems = contradictions(config, flat, keys, source or "adapter_config.json")
    if problems and source is not None:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"PEFT config contradicts its weights: {problems[0]}{more}. Fix {source}, or pass "
                         "trust_weights=True to take ranks and targets from the weights")
    if problems:
        warnings.warn("PEFT config contradicts its weights; using ranks and targets from the weights: " + "; ".join(problems[:5]))
    if problems or ALL_LINEAR in config.targets:
        return config_from_weights(config, flat, keys)
    return config

