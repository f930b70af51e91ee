"""PEFT interop both ways: `adapter_config.json` + `adapter_model.safetensors` as PEFT (0.21) saves them for BART.

PEFT key of an adapter leaf: `base_model.model.<dotted module path>.lora_A.weight` with shape (r, in) (= our
`lora_a.T`) and `...lora_B.weight` with shape (out, r) (= our `lora_b.T`); on an embedding, `...lora_embedding_A`
(r, vocab) and `...lora_embedding_B` (d_model, r), the same transposes. A modules_to_save module is stored under its
plain PyTorch names (`base_model.model.model.encoder.layernorm_embedding.weight`, `base_model.model.lm_head.weight`),
as PEFT does. On import, the config is checked against the weights (`peft_weights.reconcile_config`).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any, Mapping

import jax
import numpy as np
from lora_jax.checkpoints.adapter import base_fingerprint, check_adapter_fits, check_fingerprint, load_adapter
from lora_jax.checkpoints.files import MODEL_FILES, atomic_write, refuse_mixed_directory
from lora_jax.checkpoints.hf import torch_key
from lora_jax.checkpoints.peft_patterns import resolve_peft_patterns
from lora_jax.checkpoints.peft_fields import checked_numbers, field_problems
from lora_jax.checkpoints.peft_selection import check_selection_fields, drop_deselected, missing_targets, narrows_targets
from lora_jax.checkpoints.peft_weights import config_from_weights, reconcile_config
from lora_jax.checkpoints.safetensors_io import load_tensors, save_tensors
from lora_jax.lora.config import LoraConfig
from lora_jax.lora.transform import (
    ADAPTER_LEAVES,
    LORA_A,
    LORA_B,
    LORA_MAGNITUDE,
    WEIGHT_LEAVES,
    adapter_params,
    split_trainable,
)
from lora_jax.tree import flatten_tree, unflatten_tree

PREFIX = "base_model.model."
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
# lora_jax exports write the base fingerprint here, beside PEFT's files (PEFT ignores other files in the directory)
BASE_NAME = "lora_jax_base.json"
BART_DEFAULT_TARGETS = ("q_proj", "v_proj")
SHARED_MODULE = ("model", "shared")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _peft_pattern(pattern: str) -> str:
    """Our '/'-path regex -> PEFT's '.'-path regex (a '/' becomes an escaped dot)."""
    return pattern.replace("/", r"\.")


def _our_pattern(pattern: str) -> str:
    return pattern.replace(r"\.", "/")


def _peft_targets(targets: tuple[str, ...]) -> list[str] | str:
    """Plain module names stay a list (PEFT suffix-matches them); anything else becomes one regex that PEFT
    full-matches against dotted module names, with our suffix-at-a-boundary semantics."""
    if all(_NAME.match(t) for t in targets):
        return sorted(targets)
    return "|".join(rf"(?:.*\.)?(?:{_peft_pattern(t)})" for t in targets)


def _saved_modules(adapter_flat: Mapping[tuple, Any], config: LoraConfig) -> list[str]:
    names = set()
    for path in adapter_flat:
        if path[-1] in ADAPTER_LEAVES:
            continue
        if len(path) < 2:
            raise ValueError(
                f"modules_to_save leaf {path[0]!r} is a top-level buffer, which PEFT cannot save as a module; "
                "export a merged model instead (lora_jax.checkpoints.merged.export_merged)"
            )
        names.add(path[-2])
    return sorted(names)


def peft_state_dict(params_or_adapter: Mapping, config: LoraConfig) -> dict[str, np.ndarray]:
    """Our adapter leaves -> PEFT's state-dict names and layouts, each in the adapter's own dtype."""
    embeddings = {p[:-1] for p in flatten_tree(params_or_adapter) if p[-1] == "embedding"}
    flat = flatten_tree(adapter_params(params_or_adapter, config))
    out = {}
    for path, value in flat.items():
        if path[:2] == SHARED_MODULE:
            raise ValueError(
                f"{'/'.join(path)}: the adapter changes model/shared, which PEFT's BART never calls (its encoder and "
                "decoder call embed_tokens, its head is lm_head), so PEFT would compute something else. Untie the base "
                "(lora_jax.untie_embeddings) and adapt embed_tokens / lm_head, or export a merged model instead"
            )
        value = np.asarray(jax.device_get(value))
        if path[-1] == LORA_MAGNITUDE:  # DoRA: PEFT's name, no ".weight" in saved adapters
            out[f"{PREFIX}{'.'.join(path[:-1])}.lora_magnitude_vector"] = np.ascontiguousarray(value)
        elif path[-1] in ADAPTER_LEAVES:
            name = "A" if path[-1] == LORA_A else "B"
            module = path[:-1]
            if module in embeddings or (module[-1] in ("embed_tokens", "shared") and module + ("kernel",) not in flat):
                key = f"{PREFIX}{'.'.join(module)}.lora_embedding_{name}"  # PEFT's Embedding layer: no ".weight"
            else:
                key = f"{PREFIX}{'.'.join(module)}.lora_{name}.weight"
            out[key] = np.ascontiguousarray(value.T)
        else:
            out[PREFIX + torch_key(path)] = np.ascontiguousarray(value.T if path[-1] == "kernel" else value)
    return out


def peft_config(config: LoraConfig, base_model_name_or_path: str, modules_to_save: list[str] | None = None) -> dict:
    """adapter_config.json as PEFT 0.21 writes it for a seq2seq LoRA."""
    return {
        "alpha_pattern": {_peft_pattern(k): v for k, v in config.alpha_pattern},
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "ensure_weight_tying": False,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True if config.init == "kaiming_uniform" else "gaussian",
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": int(config.alpha) if float(config.alpha).is_integer() else config.alpha,
        "lora_bias": False,
        "lora_dropout": config.dropout,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": modules_to_save or None,
        "peft_type": "LORA",
        "qalora_group_size": 16,
        "r": config.rank,
        "rank_pattern": {_peft_pattern(k): v for k, v in config.rank_pattern},
        "revision": None,
        "target_modules": _peft_targets(config.targets),
        "task_type": "SEQ_2_SEQ_LM",
        "use_dora": config.use_dora,
        "use_qalora": False,
        "use_rslora": config.use_rslora,
    }


def export_peft(directory: str, params_or_adapter: Mapping, config: LoraConfig, base_model_name_or_path: str,
                base_params: Mapping | None = None) -> str:
    """Writes `adapter_config.json` + `adapter_model.safetensors` that `peft.PeftModel.from_pretrained` loads; the
    tensors keep the adapter's dtype (float32, or bfloat16 for bfloat16 adapters). When the base is known (in
    `params_or_adapter`, or `base_params`), `lora_jax_base.json` beside them carries its fingerprint, so importing the
    adapter on other base weights warns as `load_adapter` does."""
    state = peft_state_dict(params_or_adapter, config)
    flat = flatten_tree(adapter_params(params_or_adapter, config))
    cfg = peft_config(config, base_model_name_or_path, _saved_modules(flat, config))
    base = split_trainable(base_params if base_params is not None else params_or_adapter, config)[1]
    has_base = any(p[-1] in WEIGHT_LEAVES for p in flatten_tree(base))
    refuse_mixed_directory(directory, "a PEFT adapter", MODEL_FILES, "a model checkpoint")
    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, WEIGHTS_NAME), save_tensors(state, metadata={"format": "pt"}))
    atomic_write(os.path.join(directory, CONFIG_NAME), json.dumps(cfg, indent=2, sort_keys=True))
    fingerprint_path = os.path.join(directory, BASE_NAME)
    if has_base:
        meta = {"base_model": str(base_model_name_or_path), "base_fingerprint": base_fingerprint(base)}
        atomic_write(fingerprint_path, json.dumps(meta, indent=2))
    elif os.path.exists(fingerprint_path):  # an adapter-only export: no base to vouch for
        os.remove(fingerprint_path)
    return directory


def _leaf_name(module: str, torch_leaf: str) -> str:
    """Flax leaf name of a PyTorch parameter (modules_to_save), from the module's name."""
    if torch_leaf == "bias":
        return "bias"
    if "norm" in module:
        return "scale"
    if "embed" in module or module == "shared":
        return "embedding"
    return "kernel"


def lora_config_from_peft(cfg: Mapping[str, Any]) -> LoraConfig:
    """A LoraConfig from a PEFT adapter_config.json dict. Every field is handled as `peft_fields.PEFT_LORA_FIELDS`
    says: a ValueError naming the first field lora_jax cannot honour, a warning for each it warns about."""
    errors, warns = field_problems(cfg)
    if errors:
        more = f" (and {len(errors) - 1} more: {'; '.join(errors[1:3])})" if len(errors) > 1 else ""
        raise ValueError(f"PEFT adapter: {errors[0]}{more}")
    for message in warns:
        warnings.warn(f"PEFT adapter: {message}", stacklevel=3)
    numbers = checked_numbers(cfg)
    check_selection_fields(cfg)
    targets = cfg.get("target_modules")
    if targets is None:  # PEFT's default for BART (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["bart"])
        targets = list(BART_DEFAULT_TARGETS)
    if isinstance(targets, str):  # PEFT full-matches a regex against dotted names
        targets = (_our_pattern(targets),)
    elif not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"adapter_config.json: target_modules must be a regex or a non-empty list of module names, "
                         f"got {targets!r}")
    init = cfg.get("init_lora_weights", True)
    return LoraConfig(
        rank=numbers["r"],
        alpha=numbers["lora_alpha"],
        targets=tuple(targets),
        dropout=numbers["lora_dropout"],
        rank_pattern={_our_pattern(k): v for k, v in numbers["rank_pattern"].items()},
        alpha_pattern={_our_pattern(k): v for k, v in numbers["alpha_pattern"].items()},
        use_rslora=numbers["use_rslora"],
        modules_to_save=tuple(cfg.get("modules_to_save") or ()),
        init="gaussian" if init == "gaussian" else "kaiming_uniform",
        use_dora=numbers["use_dora"],
    )


def _read_state(directory: str) -> dict[str, np.ndarray]:
    """The adapter's tensors: adapter_model.safetensors (float32 or bfloat16), else an old torch-pickled
    adapter_model.bin (needs torch)."""
    weights, legacy = os.path.join(directory, WEIGHTS_NAME), os.path.join(directory, "adapter_model.bin")
    if os.path.exists(weights):
        return load_tensors(weights)
    if not os.path.exists(legacy):
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME} (nor an old adapter_model.bin)")
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{legacy} is a torch pickle, which needs torch to read: pip install 'lora_jax[torch]', or convert it "
            "once where torch is installed: python -c \"import torch; from safetensors.torch import save_file; "
            f"save_file(torch.load('{legacy}'), '{weights}')\""
        ) from None
    return {k: v.float().numpy() for k, v in torch.load(legacy, map_location="cpu", weights_only=True).items()}


def _lora_leaf(parts: list[str]) -> str | None:
    """lora_a / lora_b / lora_magnitude for a PEFT LoRA key's dotted parts (Linear: ...lora_A.weight; Embedding:
    ...lora_embedding_A; DoRA: ...lora_magnitude_vector, or ...lora_magnitude_vector.weight in a model's state
    dict), None for a modules_to_save parameter."""
    if parts[-1] == "lora_magnitude_vector" or parts[-2:] == ["lora_magnitude_vector", "weight"]:
        return LORA_MAGNITUDE
    if len(parts) >= 3 and parts[-2] in ("lora_A", "lora_B") and parts[-1] == "weight":
        return LORA_A if parts[-2] == "lora_A" else LORA_B
    if parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
        return LORA_A if parts[-1] == "lora_embedding_A" else LORA_B
    return None


# PEFT buffers that only its training uses: VeLoRA's activation-compression projections (backward pass only)
TRAINING_ONLY = ("lora_velora_embed",)


def _adapter_tree(state: Mapping[str, np.ndarray], skip: tuple[str, ...] = ()) -> tuple[dict, dict[tuple, str]]:
    """PEFT state dict -> (flat adapter tree, {flat path: PEFT key}); refuses what lora_jax cannot reproduce. Keys
    whose last part is in `skip` are left out."""
    flat, keys = {}, {}
    for key, value in state.items():
        parts = key.removeprefix(PREFIX).split(".")
        if parts[-1] in skip:
            continue
        leaf = _lora_leaf(parts)
        if leaf is None and "lora_" in key:
            raise ValueError(f"unsupported PEFT adapter weight {key!r} (only lora_A/lora_B, lora_embedding_A/B and DoRA's "
                             "lora_magnitude_vector are supported)")
        module = parts[:-2] if leaf is not None and parts[-1] == "weight" else parts[:-1]
        if tuple(module) == SHARED_MODULE:
            raise ValueError(
                f"{key}: the adapter trains model.shared, which BART's forward never calls (the encoder and decoder "
                "call their embed_tokens, the head is lm_head), so in PEFT it changes nothing until merged; "
                "lora_jax refuses it: target or save 'embed_tokens' / 'lm_head' instead"
            )
        value = np.asarray(value, np.float32)
        if leaf is None:  # a modules_to_save parameter under its PyTorch name
            leaf = _leaf_name(module[-1] if module else "", parts[-1])
        path = tuple(module) + (leaf,)
        flat[path] = value.T if leaf in (LORA_A, LORA_B, "kernel") else value
        keys[path] = key
    return flat, keys


def _same_name(a: str, b: str) -> bool:
    """Whether two base names plausibly name one model: 'facebook/bart-base' and '/models/bart-base/' do."""
    return os.path.basename(str(a).rstrip("/\\")).lower() == os.path.basename(str(b).rstrip("/\\")).lower()


def check_peft_base(directory: str, cfg: Mapping, config: LoraConfig, base_params: Mapping, base_model: str | None) -> None:
    """Warns when the base is not the adapter's: by the fingerprint lora_jax exports write (lora_jax_base.json), else by
    base_model_name_or_path against `base_model` (PEFT's own files say nothing of the weights)."""
    fingerprint_path = os.path.join(directory, BASE_NAME)
    if os.path.exists(fingerprint_path):
        try:
            with open(fingerprint_path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            meta = e
        if isinstance(meta, dict) and isinstance(meta.get("base_fingerprint"), dict):
            check_fingerprint(directory, meta, split_trainable(base_params, config)[1])
        else:  # the fingerprint only vouches for the base; PEFT's own files are intact, so the adapter still loads
            warnings.warn(f"{fingerprint_path} is damaged ({meta if isinstance(meta, Exception) else 'no base_fingerprint'})"
                          ": base not verified", stacklevel=3)
        return
    named = cfg.get("base_model_name_or_path")
    if named and base_model and not _same_name(named, base_model):
        warnings.warn(f"PEFT adapter in {directory} names base_model_name_or_path {named!r}, but the base given is "
                      f"{base_model!r}: PEFT's files cannot tell whether these weights are its base, so check that "
                      "outputs are what was trained", stacklevel=3)


def import_peft(directory: str, *, trust_weights: bool = False, base_params: Mapping | None = None,
                base_model: str | None = None) -> tuple[dict, LoraConfig]:
    """Reads a PEFT LoRA adapter directory -> (our adapter tree of float32 numpy arrays, LoraConfig).

    Every adapter_config.json field is honoured, refused or warned about (`peft_fields.PEFT_LORA_FIELDS`). The config
    is checked against the weights: each adapted module's rank (lora_A's rows) must be the rank the config gives it,
    each adapted module must be one PEFT adapts (a target, not taken away by exclude_modules, modules_to_save or
    layers_to_transform), each target must have weights, and modules_to_save must be exactly the saved modules; the
    first contradiction is a ValueError naming the key. trust_weights=True instead takes ranks and targets from the
    weights (the scale is then alpha / the weights' rank; weights of modules PEFT does not adapt are dropped, as PEFT
    drops them) and warns.

    base_params (the frozen base the adapter is for): every module of it the config targets must have weights (a
    ValueError naming the module), shapes must fit, and a base other than the adapter's warns (`check_peft_base`);
    base_model is the base's name or directory, compared with base_model_name_or_path."""
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}: not a PEFT adapter directory")
    with open(config_path) as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict):
        raise ValueError(f"{config_path} is not a JSON object")
    config = lora_config_from_peft(cfg)
    flat, keys = _adapter_tree(_read_state(directory), TRAINING_ONLY if cfg.get("velora_config") else ())
    flat, keys, dropped = drop_deselected(cfg, flat, keys, CONFIG_NAME if not trust_weights else None)
    config = resolve_peft_patterns(config, cfg, {"/".join(p[:-1]) for p in flat if p[-1] in (LORA_A, LORA_B)})
    config = reconcile_config(config, flat, keys, CONFIG_NAME if not trust_weights else None)
    if base_params is not None:
        missing = missing_targets(config, cfg, flat, base_params)
        if missing:
            raise ValueError(f"PEFT adapter in {directory} has no lora_A / lora_B for {missing[0]}, which target_modules "
                             f"{list(config.targets)} selects in this base ({len(missing)} such modules; PEFT would "
                             "leave them at their initial values): the adapter was made for another base, or its "
                             "weights file is incomplete")
    if dropped or narrows_targets(cfg):  # exact targets from the weights: the config alone selects what PEFT adapted
        config = config_from_weights(config, flat, keys)
    adapter = unflatten_tree(flat)
    if base_params is not None:
        check_adapter_fits(adapter, base_params)
        check_peft_base(directory, cfg, config, base_params, base_model)
    return adapter, config


def load_any_adapter(directory: str, base_params: Mapping, base_model: str | None = None) -> tuple[dict, LoraConfig]:
    """(adapter tree, LoraConfig) of a PEFT adapter directory (adapter_config.json) or a lora_jax one, checked
    against `base_params` (shapes: error; other base weights or name: warning)."""
    if os.path.exists(os.path.join(directory, CONFIG_NAME)):
        return import_peft(directory, base_params=base_params, base_model=base_model)
    adapter, config, _ = load_adapter(directory, base_params=base_params)
    return adapter, config
