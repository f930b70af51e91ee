"""transformers' logits processors for BART generation, on fixed-size buffers so they run inside the jitted loop.

Each takes (N, V) scores and (N, L) sequences whose first `cur_len` entries are filled (the rest is padding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lora_jax.generation.config import GenerationConfig

def _no_repeat_ngram_mask(sequences: jax.Array, cur_len: jax.Array, n: int, vocab: int) -> jax.Array:
    """(N, V) True where emitting the token would repeat an n-gram already in sequences[:, :cur_len]."""
    num, length = sequences.shape
    if n > length:  # no n-gram fits in the buffer, so none can repeat
        return jnp.zeros((num, vocab), bool)
    prefix_start = cur_len - (n - 1)
    prefix = jax.lax.dynamic_slice_in_dim(sequences, jnp.maximum(prefix_start, 0), n - 1, axis=1)  # (N, n-1)
    starts = jnp.arange(length - n + 1)
    windows = jnp.stack([sequences[:, j : j + length - n + 1] for j in range(n)], axis=-1)  # (N, W, n)
    hit = jnp.all(windows[:, :, : n - 1] == prefix[:, None, :], axis=-1) & (starts[None, :] + n <= cur_len)
    hit = hit & (cur_len + 1 >= n)
    rows = jnp.broadcast_to(jnp.arange(num)[:, None], hit.shape)
    return jnp.zeros((num, vocab), bool).at[rows, windows[:, :, n - 1]].max(hit)


def _force(scores: jax.Array, token: int, when: jax.Array) -> jax.Array:
    forced = jnp.full_like(scores, -jnp.inf).at[:, token].set(0.0)
    return jnp.where(when, forced, scores)


def process_scores(scores: jax.Array, sequences: jax.Array, cur_len: jax.Array, cfg: GenerationConfig) -> jax.Array:
    """Applies transformers' processors for these settings, in transformers' order."""
    vocab = scores.shape[-1]
    if cfg.no_repeat_ngram_size > 0:
        scores = jnp.where(_no_repeat_ngram_mask(sequences, cur_len, cfg.no_repeat_ngram_size, vocab), -jnp.inf, scores)
    if cfg.min_length > 0:
        scores = jnp.where((cur_len < cfg.min_length) & (jnp.arange(vocab) == cfg.eos_token_id), -jnp.inf, scores)
    if cfg.forced_bos_token_id is not None:
        scores = _force(scores, cfg.forced_bos_token_id, cur_len == 1)
    if cfg.forced_eos_token_id is not None:
        scores = _force(scores, cfg.forced_eos_token_id, cur_len == cfg.total_length - 1)
    return scores
