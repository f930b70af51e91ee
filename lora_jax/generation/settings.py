"""Which of transformers' generation settings lora_jax honours, which it ignores (they never change the tokens), and
which it refuses (they would change the tokens and are not implemented), plus how JSON values become hashable.

Every key of `transformers.GenerationConfig` (5.x) is in exactly one of: the fields of our `GenerationConfig`,
`NO_EFFECT_KEYS`, or `UNSUPPORTED_NEUTRAL` (refused unless it holds its no-op value). A key in none of them is
unknown and refused too, so no setting is ever dropped silently.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

# Settings that do not change the generated ids (outputs returned, caching, bookkeeping, assisted decoding knobs that
# only apply when an assistant model is given, which lora_jax has no way to pass).
NO_EFFECT_KEYS = frozenset({
    "_from_model_config", "_commit_hash", "_original_object_hash", "transformers_version", "bos_token_id",
    "use_cache", "output_attentions", "output_hidden_states", "output_scores", "output_logits",
    "return_dict_in_generate", "cache_implementation", "cache_config", "compile_config", "disable_compile",
    "max_cache_len", "prefill_chunk_size", "continuous_batching_config", "is_assistant", "num_assistant_tokens",
    "num_assistant_tokens_schedule", "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind",
    "assistant_ensemble_weight", "max_matching_ngram_size", "speculation_type",
})

# Settings that change the ids and that lora_jax does not implement, with the values that mean "off" (refused only
# when set to something else).
UNSUPPORTED_NEUTRAL: dict[str, tuple] = {
    "constraints": (None,),
    "force_words_ids": (None,),
    "penalty_alpha": (None, 0, 0.0),
    "dola_layers": (None,),
    "guidance_scale": (None, 1, 1.0),
    "max_time": (None,),
    "stop_strings": (None,),
    "watermarking_config": (None,),
    "top_h": (None,),
    "epsilon_cutoff": (None, 0, 0.0),
    "eta_cutoff": (None, 0, 0.0),
    "low_memory": (None, False),
    "prompt_lookup_num_tokens": (None,),
    "assistant_early_exit": (None,),
    "use_mtp": (None, False),
    "token_healing": (None, False),
}

# Keys of a legacy `config.json` that transformers reads as generation settings (its GenerationConfig attributes);
# the rest of config.json describes the architecture.
def generation_keys(fields: Iterable[str]) -> frozenset:
    return frozenset(fields) | NO_EFFECT_KEYS | frozenset(UNSUPPORTED_NEUTRAL)


def refuse_unsupported(settings: Mapping[str, Any], fields: Iterable[str], where: str) -> None:
    """Raises ValueError naming the first setting of `settings` that lora_jax would otherwise drop: one it does not
    implement (set to a non-neutral value) or one it does not know."""
    fields = frozenset(fields)
    for key, value in settings.items():
        if key in fields or key in NO_EFFECT_KEYS:
            continue
        if key in UNSUPPORTED_NEUTRAL:
            if any(value is v or (type(value) is type(v) and value == v) for v in UNSUPPORTED_NEUTRAL[key]):
                continue
            raise ValueError(
                f"{where}: generation setting {key}={value!r} is not implemented by lora_jax (it would change the "
                f"generated ids); remove it or set it to {UNSUPPORTED_NEUTRAL[key][0]!r}"
            )
        raise ValueError(
            f"{where}: unknown generation setting {key!r}; lora_jax honours {sorted(fields)} "
            f"and ignores only settings that never change the ids ({sorted(k for k in NO_EFFECT_KEYS if k[0] != '_')})"
        )


def _tuple_of_ints(value, name: str) -> tuple[int, ...]:
    if isinstance(value, (int,)) and not isinstance(value, bool):
        return (int(value),)
    if not isinstance(value, (list, tuple)) or not value or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise ValueError(f"{name} must be a non-empty list of token ids (integers >= 0), got {value!r}")
    return tuple(int(v) for v in value)


def _sequence_bias(value) -> tuple:
    """transformers' forms ([[ids], bias] pairs, or {tuple(ids): bias}) -> ((ids, bias), ...) in the given order."""
    pairs = list(value.items()) if isinstance(value, Mapping) else value
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise ValueError(f"sequence_bias must be a non-empty list of [token ids, bias] pairs, got {value!r}")
    out = []
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[1], (int, float)):
            raise ValueError(f"sequence_bias entries must be [token ids, bias] pairs, got {pair!r}")
        out.append((_tuple_of_ints(list(pair[0]), "sequence_bias token ids"), float(pair[1])))
    return tuple(out)


def normalise(d: Mapping[str, Any]) -> dict[str, Any]:
    """JSON / Python values of transformers' settings -> the hashable values GenerationConfig holds (lists become
    tuples), checked for shape; other values are returned unchanged."""
    out = dict(d)
    for key in ("eos_token_id", "forced_eos_token_id"):
        if isinstance(out.get(key), (list, tuple)):
            ids = _tuple_of_ints(out[key], key)
            out[key] = ids[0] if len(ids) == 1 else ids
    for key in ("suppress_tokens", "begin_suppress_tokens"):
        if out.get(key) is not None:
            out[key] = _tuple_of_ints(out[key], key) if out[key] != [] else ()
    if out.get("bad_words_ids") is not None:
        words = out["bad_words_ids"]
        if not isinstance(words, (list, tuple)) or not words:
            raise ValueError(f"bad_words_ids must be a non-empty list of token-id lists, got {words!r}")
        out["bad_words_ids"] = tuple(_tuple_of_ints(w, "bad_words_ids entries") for w in words)
    if out.get("sequence_bias") is not None:
        out["sequence_bias"] = _sequence_bias(out["sequence_bias"])
    decay = out.get("exponential_decay_length_penalty")
    if decay is not None:
        if not isinstance(decay, (list, tuple)) or len(decay) != 2:
            raise ValueError(f"exponential_decay_length_penalty must be [start_index, decay_factor], got {decay!r}")
        out["exponential_decay_length_penalty"] = (int(decay[0]), float(decay[1]))
    return out
