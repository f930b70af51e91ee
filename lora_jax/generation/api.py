"""The public generation functions: `generate`, `generate_padded`, `resolve_config`.

Each call runs one compiled program per (model, settings, shapes) (see `search.decode_jit`). Scoring follows transformers'
(4.57) PyTorch `generate` exactly: log-softmax (beam search), then the logits processors (no-repeat n-gram, min
length, forced BOS / EOS), then the beam bookkeeping, so outputs match token for token.

Output ids are laid out as transformers returns them: `decoder_start_token_id` first, `pad_token_id` after `</s>`.
`generate` trims the fixed (B, max_length) buffer on the host to the longest returned sequence (transformers' shape);
`generate_padded` returns the buffer itself, with no host synchronisation.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.generation.config import GenerationConfig, config_from_model, load_generation_config
from lora_jax.generation.search import decode, decode_jit

def trim(ids: np.ndarray, cfg: GenerationConfig) -> np.ndarray:
    """Crops the fixed-size output buffer to the longest sequence (up to and including its `</s>`), as transformers
    returns it."""
    generated = ids[:, 1:]
    is_eos = generated == cfg.eos_token_id
    lengths = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, generated.shape[1])
    return ids[:, : 1 + int(lengths.max(initial=0))]


def resolve_config(model, generation_config=None, **overrides: Any) -> GenerationConfig:
    """The settings `generate` uses: `overrides` that are not None, else `generation_config` (a GenerationConfig,
    or a dict merged over the model config's defaults), else the model config's generation fields."""
    if generation_config is None:
        cfg = config_from_model(model.config)
    elif isinstance(generation_config, GenerationConfig):
        cfg = generation_config
    elif isinstance(generation_config, Mapping):
        cfg = GenerationConfig.from_dict({**config_from_model(model.config).to_dict(), **generation_config})
    else:
        raise TypeError(
            f"generation_config must be a GenerationConfig, a dict or None, got {type(generation_config).__name__}; "
            "use load_generation_config(checkpoint_dir) to read one"
        )
    cfg = cfg.replace(**overrides)
    cfg.validate()
    max_positions = model.config.max_position_embeddings
    if cfg.total_length > max_positions:
        raise ValueError(
            f"generation length {cfg.total_length} exceeds the model's max_position_embeddings ({max_positions}); "
            "lower max_new_tokens"
        )
    return cfg


def _check_inputs(input_ids, attention_mask) -> tuple[jax.Array, jax.Array]:
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must both be (batch, source_len)"
        )
    return input_ids, attention_mask


def _unwrap_params(params):
    # Accept {'params': tree} (linen variables) as well as the bare tree.
    if isinstance(params, Mapping) and set(params) == {"params"}:
        return params["params"]
    return params


def _generate_buffer(model, params, input_ids, attention_mask, cfg: GenerationConfig, jit: bool,
                     adapter_ids=None) -> jax.Array:
    input_ids, attention_mask = _check_inputs(input_ids, attention_mask)
    if adapter_ids is not None:
        adapter_ids = _check_adapter_ids(adapter_ids, input_ids.shape[0])
        if hasattr(model, "check_adapter_ids"):  # inside jit an out-of-range id would be clamped silently
            model.check_adapter_ids(adapter_ids)
    fn = decode_jit if jit else decode
    ids, _ = fn(model, cfg, _unwrap_params(params), input_ids, attention_mask, adapter_ids)
    return ids


def _check_adapter_ids(adapter_ids, batch: int) -> jax.Array:
    # Per-example adapters (MultiLoraModel): one id per input row; generate repeats them per beam itself.
    adapter_ids = jnp.asarray(adapter_ids)
    if adapter_ids.shape != (batch,) or not jnp.issubdtype(adapter_ids.dtype, jnp.integer):
        raise ValueError(f"adapter_ids must be (batch,) = ({batch},) integers, one per input row; "
                         f"got {adapter_ids.dtype} {adapter_ids.shape}")
    return adapter_ids.astype(jnp.int32)


def generate_padded(model, params, input_ids, attention_mask, *, generation_config=None, jit: bool = True,
                    adapter_ids=None, **settings: Any) -> jax.Array:
    """Like `generate` (same keyword settings), but returns the untrimmed (B, max_length) buffer as a device array,
    without a host sync: the decoder start token, the generated tokens, then `pad_token_id`."""
    cfg = resolve_config(model, generation_config, **settings)
    return _generate_buffer(model, params, input_ids, attention_mask, cfg, jit, adapter_ids)


def generate(
    model,
    params,
    input_ids,
    attention_mask,
    *,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    length_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    min_length: int | None = None,
    forced_bos_token_id: int | None = None,
    forced_eos_token_id: int | None = None,
    early_stopping: bool | str | None = None,
    generation_config: GenerationConfig | Mapping[str, Any] | None = None,
    jit: bool = True,
    adapter_ids=None,
) -> np.ndarray:
    """Generates ids (B, L) int32 for input_ids / attention_mask (B, S), as transformers' `generate` returns them.

    model: a BartForConditionalGeneration or a LoraModel around one (anything whose `apply` takes the method names
      "encode", "init_cache" (with num_beams) and "decode", and that has `.config`). params: its parameter tree (or
      {"params": tree}).
    Settings left as None come from `generation_config` (a GenerationConfig or a dict, e.g.
    `load_generation_config(checkpoint_dir)`), else from the model's config. To switch forced_bos/forced_eos off
    when the config sets them, pass a generation_config holding them as None (an explicit None argument here means
    "inherit"). The fixed (B, max_length) buffer is trimmed on the host to the longest sequence; `generate_padded`
    returns it untrimmed. jit=False skips the outer `jax.jit` (e.g. when already inside jitted code); for a fully
    eager run use `with jax.disable_jit():`.
    adapter_ids (B,): with a `MultiLoraModel`, each input's adapter slot (0 = the base); the encoder uses them per
    input and the decoder per beam, in one compiled program whatever the mix.
    """
    cfg = resolve_config(
        model, generation_config, num_beams=num_beams, max_new_tokens=max_new_tokens, length_penalty=length_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size, min_length=min_length, forced_bos_token_id=forced_bos_token_id,
        forced_eos_token_id=forced_eos_token_id, early_stopping=early_stopping,
    )
    return trim(np.asarray(_generate_buffer(model, params, input_ids, attention_mask, cfg, jit, adapter_ids)), cfg)
