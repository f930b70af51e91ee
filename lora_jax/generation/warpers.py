"""transformers' sampling warpers (temperature, top-k, top-p, min-p, typical-p), in its order, on (N, V) scores.

They only run when `do_sample` is set, after the logits processors (`processors.process_scores`). Removed tokens get
-inf, so `jax.random.categorical` never draws them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lora_jax.generation.config import GenerationConfig


def _keep_top(remove: jax.Array, scores: jax.Array, keep: int) -> jax.Array:
    """`remove` (N, V) with the `keep` highest-scoring tokens of each row never removed."""
    top = jax.lax.top_k(scores, min(keep, scores.shape[-1]))[1]
    rows = jnp.arange(scores.shape[0])[:, None]
    return remove.at[rows, top].set(False)


def top_k(scores: jax.Array, k: int, keep: int) -> jax.Array:
    k = min(max(k, keep), scores.shape[-1])
    kth = jax.lax.top_k(scores, k)[0][:, -1:]
    return jnp.where(scores < kth, -jnp.inf, scores)


def _unsort(sorted_values: jax.Array, order: jax.Array) -> jax.Array:
    rows = jnp.arange(order.shape[0])[:, None]
    return jnp.zeros_like(sorted_values).at[rows, order].set(sorted_values)


def top_p(scores: jax.Array, p: float, keep: int) -> jax.Array:
    """Removes the tokens whose cumulative probability, counted from the least likely, is <= 1 - p."""
    order = jnp.argsort(scores, axis=-1)  # ascending, as transformers sorts
    sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_scores, axis=-1), axis=-1)
    remove = (cumulative <= 1 - p).at[:, scores.shape[-1] - keep :].set(False)
    return jnp.where(_unsort(remove, order), -jnp.inf, scores)


def min_p(scores: jax.Array, p: float, keep: int) -> jax.Array:
    probs = jax.nn.softmax(scores, axis=-1)
    remove = probs < p * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(_keep_top(remove, probs, keep), -jnp.inf, scores)


def typical_p(scores: jax.Array, mass: float, keep: int) -> jax.Array:
    """Keeps the tokens whose surprise is closest to the entropy, up to `mass` of probability."""
    log_probs = jax.nn.log_softmax(scores, axis=-1)
    probs = jnp.exp(log_probs)
    entropy = -jnp.nansum(log_probs * probs, axis=-1, keepdims=True)
    shifted = jnp.abs(-log_probs - entropy)
    order = jnp.argsort(shifted, axis=-1)
    sorted_shifted = jnp.take_along_axis(shifted, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(scores, order, axis=-1), axis=-1), axis=-1)
    last = jnp.minimum(jnp.sum(cumulative < mass, axis=-1), scores.shape[-1] - 1)
    remove = sorted_shifted > jnp.take_along_axis(sorted_shifted, last[:, None], axis=-1)
    remove = remove.at[:, :keep].set(False)
    return jnp.where(_unsort(remove, order), -jnp.inf, scores)


def warp(scores: jax.Array, cfg: GenerationConfig, keep: int) -> jax.Array:
    """transformers' warpers for `cfg` in its order; `keep`: tokens never removed (min_tokens_to_keep)."""
    if cfg.temperature != 1.0:
        scores = scores / cfg.temperature
    if cfg.top_k:
        scores = top_k(scores, cfg.top_k, keep)
    if cfg.top_p < 1.0:
        scores = top_p(scores, cfg.top_p, keep)
    if cfg.min_p is not None:
        scores = min_p(scores, cfg.min_p, keep)
    if cfg.typical_p < 1.0:
        scores = typical_p(scores, cfg.typical_p, keep)
    return scores
