"""Every field of PEFT's `LoraConfig` (PEFT 0.21.2, the newest release) and what `import_peft` does with it, as data.

A field is
  honoured  lora_jax computes exactly what PEFT computes with it (checked for type and range; errors name the key);
  metadata  it does not change what the adapter computes on a given base (PEFT's bookkeeping, or training-only init);
  checked   compared against the base given (`base_model_name_or_path`, `task_type`): a warning when they differ;
  warned    lora_jax runs the same forward computation as PEFT but not everything PEFT does (a warning);
  refused   at any value but its `inert` ones (the feature off) it is an error naming the key: PEFT would compute
            something lora_jax does not.
A field this table does not know (a PEFT newer than the table) is accepted only at an inert value (None, False, {},
[], "") and refused otherwise, so a new PEFT feature is never silently dropped. `tests/fixtures/peft_lora_config_fields.json`
records PEFT's field list; a test fails when PEFT has a field this table does not classify.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

HONOURED, METADATA, CHECKED, WARNED, REFUSED = "honoured", "metadata", "checked", "warned", "refused"
# values that mean "feature off" for a field this table does not know
UNKNOWN_INERT = (None, False, {}, [], "")


@dataclasses.dataclass(frozen=True)
class FieldRule:
    """How `import_peft` handles one PEFT LoraConfig field; `inert`: values at which a warned/refused field is off."""

    handling: str
    why: str
    inert: tuple = (None,)


def _rule(handling: str, why: str, *inert) -> FieldRule:
    return FieldRule(handling, why, (None, *inert))  # null is "off" for every field, as PEFT's defaults are


PEFT_LORA_FIELDS: dict[str, FieldRule] = {
    "task_type": _rule(CHECKED, "SEQ_2_SEQ_LM (or null) is BART's; another task type warns: PEFT would apply the same "
                       "LoRA weights to this model, but the adapter was made for another kind of model"),
    "peft_type": _rule(REFUSED, "it is not LoRA (only peft_type LORA is read)", "LORA"),
    "auto_mapping": _rule(METADATA, "which PeftModel class AutoPeftModel picks; no effect on the weights"),
    "peft_version": _rule(METADATA, "the PEFT version that saved the adapter"),
    "base_model_name_or_path": _rule(CHECKED, "compared with the base given (a warning when they differ); the weights "
                                     "are compared too when lora_jax exported the adapter (lora_jax_base.json)"),
    "revision": _rule(METADATA, "the hub revision PEFT would download the base at; lora_jax uses the base it is given"),
    "inference_mode": _rule(METADATA, "whether PEFT froze the adapter when loading"),
    "r": _rule(HONOURED, "the rank, checked against lora_A's rows"),
    "target_modules": _rule(HONOURED, "names (suffix match) or one regex (full match), and 'all-linear'; every targeted "
                            "module of the base must have weights"),
    "exclude_modules": _rule(HONOURED, "PEFT leaves these modules unadapted: weights for one of them are refused "
                             "(with trust_weights=True: dropped with a warning, as PEFT drops them)"),
    "lora_alpha": _rule(HONOURED, "scale alpha / r"),
    "lora_dropout": _rule(HONOURED, "dropout on the adapter input when training; a number in [0, 1)"),
    "fan_in_fan_out": _rule(REFUSED, "GPT-2 Conv1D layout; BART's Linear layers are (out, in)", False),
    "bias": _rule(REFUSED, "lora_jax supports bias='none' only (PEFT trains the base's biases otherwise)", "none"),
    "use_rslora": _rule(HONOURED, "scale alpha / sqrt(r)"),
    "modules_to_save": _rule(HONOURED, "full copies of modules, checked against the saved weights"),
    "init_lora_weights": _rule(HONOURED, "True/False/gaussian/eva/orthogonal/mica only decide where training started "
                               "(W + scale*B@A after it); pissa/olora/corda/lora_ga (residual base) and loftq (quantised "
                               "base) adapters apply to a base PEFT changed, and are refused"),
    "layers_to_transform": _rule(HONOURED, "only these layer indices of list target_modules, PEFT's index rule; "
                                 "weights of other layers are refused (trust_weights: dropped, as PEFT drops them)"),
    "layers_pattern": _rule(HONOURED, "the name before the layer index (layers_to_transform)"),
    "rank_pattern": _rule(HONOURED, "per-module ranks, PEFT's key matching"),
    "alpha_pattern": _rule(HONOURED, "per-module alphas, PEFT's key matching"),
    "megatron_config": _rule(REFUSED, "Megatron parallel layers"),
    "megatron_core": _rule(METADATA, "only read with megatron_config"),
    "trainable_token_indices": _rule(REFUSED, "PEFT's trainable-token deltas on embeddings"),
    "loftq_config": _rule(METADATA, "only read with init_lora_weights='loftq' (refused); PEFT ignores it otherwise"),
    "eva_config": _rule(METADATA, "EVA initialisation settings (training only)"),
    "corda_config": _rule(METADATA, "CorDA initialisation settings; init_lora_weights='corda' itself is refused"),
    "lora_ga_config": _rule(METADATA, "LoRA-GA initialisation settings; init_lora_weights='lora_ga' itself is refused"),
    "use_dora": _rule(HONOURED, "DoRA's magnitude vector (lora_magnitude_vector)"),
    "velora_config": _rule(WARNED, "VeLoRA changes only the backward pass (compressed activations): the forward is "
                           "LoRA's; lora_jax skips its lora_velora_embed buffers and trains without it"),
    "alora_invocation_tokens": _rule(REFUSED, "activated LoRA applies the adapter only from the invocation tokens on; "
                                     "lora_jax applies it to every token"),
    "use_qalora": _rule(REFUSED, "QA-LoRA pools the adapter input in groups", False),
    "qalora_group_size": _rule(METADATA, "only read with use_qalora"),
    "monteclora_config": _rule(REFUSED, "Monte Carlo sampling of the adapter weights"),
    "layer_replication": _rule(REFUSED, "a model with replicated layers"),
    "runtime_config": _rule(METADATA, "runtime settings, never saved"),
    "lora_bias": _rule(REFUSED, "a bias on lora_B", False),
    "target_parameters": _rule(REFUSED, "LoRA on bare nn.Parameters (MoE experts)", []),
    "use_bdlora": _rule(REFUSED, "block-diagonal lora_A / lora_B", False),
    "arrow_config": _rule(REFUSED, "Arrow routing among several adapters per token"),
    "kasa_config": _rule(REFUSED, "KaSA truncates the base weight's singular values and adds a learned diagonal"),
    "ensure_weight_tying": _rule(HONOURED, "no effect unless embed_tokens / lm_head / shared are targeted or saved; "
                                 "then PEFT ties their adapters, which lora_jax does not, and it is refused"),
}

TASK_TYPES = ("SEQ_2_SEQ_LM", "CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
HONOURED_INITS = (True, False, None, "gaussian", "eva", "orthogonal", "mica")
_RESIDUAL_INIT = re.compile(r"pissa(_niter_\d+)?|olora|corda|lora_ga")


def _inert(value: Any, inert: tuple) -> bool:
    return any(value == v and type(value) is type(v) for v in inert)  # type too: 0 is not False, [] is not {}


def _init_problem(init: Any) -> str | None:
    if init in HONOURED_INITS and (init is None or isinstance(init, (bool, str))):
        return None
    if isinstance(init, str) and _RESIDUAL_INIT.fullmatch(init):
        return (f"init_lora_weights={init!r}: this adapter was saved without conversion and only applies to PEFT's "
                "residual base, not to the original model. Save it again in PEFT with save_pretrained(..., "
                "path_initial_model_for_weight_conversion=<the initial adapter>) and import that")
    if init == "loftq":
        return ("init_lora_weights='loftq': a LoftQ adapter corrects the LoftQ-quantised base PEFT made, not the "
                "original weights; load it in PEFT with that base, merge it there, and export the merged model")
    return f"init_lora_weights={init!r} is not a PEFT initialisation lora_jax knows ({HONOURED_INITS} are honoured)"


def _number(cfg: Mapping[str, Any], key: str, kind: type, low: float, high: float | None, default: Any,
            where: str = "") -> Any:
    """cfg[key] (PEFT's default when absent) as `kind` in [low, high) (high None: no bound); a ValueError naming the
    key otherwise."""
    value = cfg[key] if key in cfg else default  # null is PEFT's crash too, so an error here
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if not bad and kind is int and not float(value).is_integer():
        bad = True
    if bad or value < low or (high is not None and value >= high):
        span = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"adapter_config.json: {where}{key}={value!r} must be a{'n' if kind is int else ''} "
                         f"{kind.__name__} {span}")
    return kind(value)


def checked_numbers(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """r, lora_alpha, lora_dropout, the pattern values and the honoured flags, type- and range-checked (errors name
    the key)."""
    out = {"r": _number(cfg, "r", int, 1, None, 8), "lora_alpha": _number(cfg, "lora_alpha", float, 0, None, 8),
           "lora_dropout": _number(cfg, "lora_dropout", float, 0, 1, 0.0)}
    for key in ("use_rslora", "use_dora"):
        out[key] = cfg.get(key) or False
        if not isinstance(out[key], bool):
            raise ValueError(f"adapter_config.json: {key}={cfg[key]!r} must be true or false")
    for key, kind in (("rank_pattern", int), ("alpha_pattern", float)):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict):
            raise ValueError(f"adapter_config.json: {key} must be an object {{module pattern: value}}, got {pattern!r}")
        out[key] = {k: _number(pattern, k, kind, 1 if kind is int else 0, None, None, f"{key} entry ") for k in pattern}
    return out


def field_problems(cfg: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(errors, warnings) for a PEFT adapter_config.json dict, by `PEFT_LORA_FIELDS`; each names its key."""
    errors, warns = [], []
    for key, value in cfg.items():
        rule = PEFT_LORA_FIELDS.get(key)
        if rule is None:
            if not _inert(value, UNKNOWN_INERT):
                errors.append(f"{key}={value!r} is a PEFT field lora_jax does not know (newer than PEFT 0.21.2?): "
                              "it cannot tell whether PEFT computes something else with it")
        elif rule.handling == REFUSED and not _inert(value, rule.inert):
            errors.append(f"{key}={value!r} is not supported by lora_jax: {rule.why}")
        elif rule.handling == WARNED and not _inert(value, rule.inert):
            warns.append(f"{key} is set: {rule.why}")
    init = cfg.get("init_lora_weights", True)
    problem = _init_problem(init)
    if problem:
        errors.append(problem)
    tied = [str(cfg.get(k)) for k in ("target_modules", "modules_to_save")]
    if cfg.get("ensure_weight_tying") and any(name in t for t in tied for name in ("embed_tokens", "lm_head", "shared")):
        errors.append("ensure_weight_tying=True with embed_tokens / lm_head adapted or saved: PEFT ties their adapters, "
                      "which lora_jax does not; save the adapter in PEFT with ensure_weight_tying=False")
    task = cfg.get("task_type")
    if task not in (None, *TASK_TYPES):
        errors.append(f"task_type={task!r} is not a PEFT task type ({', '.join(TASK_TYPES)})")
    elif task not in (None, "SEQ_2_SEQ_LM"):
        warns.append(f"task_type={task!r}: the adapter was made for a {task} model, not BART's SEQ_2_SEQ_LM; PEFT "
                     "would apply the same LoRA weights here, so lora_jax does too — check it was trained on this base")
    return errors, warns
