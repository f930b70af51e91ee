"""The public generation functions: `generate`, `generate_padded`, `resolve_config`.

Which settings apply: keyword settings, over `generation_config` (a GenerationConfig replaces the defaults, a dict
is merged over them), over the model's defaults: the checkpoint's own settings when the model came from
`load_pretrained` (its `generation_config.json`, else the generation keys of its `config.json`, as transformers reads
them), else its config's generation fields. A setting lora_jax does not implement, or does not know, raises an error
naming it, whichever way it arrives.

Each call runs one compiled program per (model, settings, shapes) (see `search.decode_jit`). Scoring follows
transformers' PyTorch `generate` exactly: log-softmax (beam search), then the logits processors in transformers'
order (`processors.py`), then the beam bookkeeping, so outputs match token for token; sampling draws from the
processed scores with a JAX PRNG key.

Output ids are laid out as transformers returns them: `decoder_start_token_id` first, `pad_token_id` after `</s>`,
num_return_sequences rows per input (input i's at rows i*n .. i*n+n-1, best beam first).
`generate` trims the fixed (rows, max_length) buffer on the host to the longest returned sequence (transformers'
shape); `generate_padded` returns the buffer itself, with no host synchronisation.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.generation.config import DEFAULT_NEW_TOKENS, GenerationConfig, model_generation_config
from lora_jax.generation.search import decode, decode_jit


def trim(ids: np.ndarray, cfg: GenerationConfig) -> np.ndarray:
    """Crops the fixed-size output buffer to the longest sequence (up to and including its first end-of-sequence
    token), as transformers returns it."""
    generated = ids[:, 1:]
    is_eos = np.isin(generated, cfg.eos_ids)
    lengths = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, generated.shape[1])
    return ids[:, : 1 + int(lengths.max(initial=0))]


def resolve_config(model, generation_config=None, **overrides: Any) -> GenerationConfig:
    """The settings `generate` uses: `overrides` that are not None, over `generation_config` (a GenerationConfig as
    is, or a dict merged over the model's defaults), over the model's defaults (`model.generation_config`, which
    `load_pretrained` sets from the checkpoint, else its config's generation fields)."""
    if generation_config is None:
        cfg = model_generation_config(model)
    elif isinstance(generation_config, GenerationConfig):
        cfg = generation_config
    elif isinstance(generation_config, Mapping):
        cfg = GenerationConfig.from_dict(generation_config, model_generation_config(model), where="generation_config")
    else:
        raise TypeError(
            f"generation_config must be a GenerationConfig, a dict or None, got {type(generation_config).__name__}; "
            "use load_generation_config(checkpoint_dir) to read one"
        )
    cfg = cfg.replace(**overrides)
    max_positions = model.config.max_position_embeddings
    if cfg.max_new_tokens is None and cfg.max_length is None:  # transformers: 20 new tokens, within the positions
        cfg = cfg.replace(max_length=min(DEFAULT_NEW_TOKENS + 1, max_positions))
    cfg.validate()
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


def _check_adapter_ids(adapter_ids, batch: int) -> jax.Array:
    # Per-example adapters (MultiLoraModel): one id per input row; generate repeats them per beam itself.
    adapter_ids = jnp.asarray(adapter_ids)
    if adapter_ids.shape != (batch,) or not jnp.issubdtype(adapter_ids.dtype, jnp.integer):
        raise ValueError(f"adapter_ids must be (batch,) = ({batch},) integers, one per input row; "
                         f"got {adapter_ids.dtype} {adapter_ids.shape}")
    return adapter_ids.astype(jnp.int32)


def check_key(cfg: GenerationConfig, prng_key):
    """The PRNG key sampling needs (None when not sampling: greedy and beam search are deterministic)."""
    if not cfg.do_sample:
        return None
    if prng_key is None:
        raise ValueError("do_sample=True draws tokens at random: pass prng_key=jax.random.PRNGKey(seed) "
                         "(the same key gives the same output)")
    return prng_key


def _generate_buffer(model, params, input_ids, attention_mask, cfg: GenerationConfig, jit: bool,
                     adapter_ids=None, prng_key=None) -> jax.Array:
    input_ids, attention_mask = _check_inputs(input_ids, attention_mask)
    if adapter_ids is not None:
        adapter_ids = _check_adapter_ids(adapter_ids, input_ids.shape[0])
        if hasattr(model, "check_adapter_ids"):  # inside jit an out-of-range id would be clamped silently
            model.check_adapter_ids(adapter_ids)
    fn = decode_jit if jit else decode
    ids, _ = fn(model, cfg, _unwrap_params(params), input_ids, attention_mask, adapter_ids, check_key(cfg, prng_key))
    return ids


def generate_padded(model, params, input_ids, attention_mask, *, generation_config=None, jit: bool = True,
                    adapter_ids=None, prng_key=None, **settings: Any) -> jax.Array:
    """Like `generate` (same keyword settings), but returns the untrimmed (rows, max_length) buffer as a device
    array, without a host sync: the decoder start token, the generated tokens, then `pad_token_id`."""
    cfg = resolve_config(model, generation_config, **settings)
    return _generate_buffer(model, params, input_ids, attention_mask, cfg, jit, adapter_ids, prng_key)


def generate(model, params, input_ids, attention_mask, *, generation_config=None, jit: bool = True,
             adapter_ids=None, prng_key=None, **settings: Any) -> np.ndarray:
    """Generates ids (B * num_return_sequences, L) int32 for input_ids / attention_mask (B, S), as transformers'
    `generate` returns them.

    model: a BartForConditionalGeneration or a LoraModel around one (anything whose `apply` takes the method names
      "encode", "init_cache" (with num_beams) and "decode", and that has `.config`). params: its parameter tree (or
      {"params": tree}).
    settings: any `GenerationConfig` field by name (num_beams=4, repetition_penalty=1.2, do_sample=True, top_p=0.9,
      num_return_sequences=2, eos_token_id=[2, 7], ...). Settings left out (or None) come from `generation_config`
      (a GenerationConfig, or a dict merged over the model's defaults), else from the model's defaults (the
      checkpoint's generation settings for a model from `load_pretrained`). To switch forced_bos/forced_eos off
      when the defaults set them, pass a generation_config dict holding them as None. A setting that lora_jax does
      not implement or know raises a ValueError naming it.
    prng_key: a `jax.random.PRNGKey`, required with do_sample (the same key gives the same output).
    The fixed buffer is trimmed on the host to the longest sequence; `generate_padded` returns it untrimmed.
    jit=False skips the outer `jax.jit` (e.g. when already inside jitted code); for a fully eager run use
    `with jax.disable_jit():`.
    adapter_ids (B,): with a `MultiLoraModel`, each input's adapter slot (0 = the base); the encoder uses them per
    input and the decoder per beam, in one compiled program whatever the mix.
    """
    cfg = resolve_config(model, generation_config, **settings)
    ids = _generate_buffer(model, params, input_ids, attention_mask, cfg, jit, adapter_ids, prng_key)
    return trim(np.asarray(ids), cfg)
