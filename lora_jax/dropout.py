"""Dropout whose mask costs half the random bits of `flax.linen.Dropout`'s, and is kept, not redrawn, under remat.

Semantics are linen's: in training each element is kept with probability 1 - rate and scaled by 1 / (1 - rate),
otherwise zeroed; `deterministic=True` (or rate 0) is the identity. What differs is how the mask is drawn:

* `flax.linen.Dropout` calls `jax.random.bernoulli`, one 32-bit word per element, which with the counter-based
  Philox4x32-10 keys of a train step (`lora_jax.training.step`) is one Philox block per element. Here each 32-bit
  word of the same generator serves two elements: its low and high 16 bits are compared against the rate's 16-bit
  threshold, so half the Philox blocks are computed. The rate is rounded to a multiple of 2**-16 (0.1 becomes
  0.100006); elements are independent, as bits of one Philox output are.
* The mask is named `DROPOUT_MASK` (`jax.ad_checkpoint.checkpoint_name`), so the 'dots' remat policy keeps it (one
  byte per element) instead of drawing it again in the backward pass.

The random stream is therefore not linen's: the same key draws another mask than `nn.Dropout` would. A checkpoint's
run continues bit for bit only with code that draws masks the same way, so `MASK_SCHEME` is in the resume fingerprint.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

# Names how masks are drawn from a key; a resumed run compares it (train.resume.dropout_layout).
MASK_SCHEME = "bits32-as-two-16bit-thresholds"
DROPOUT_MASK = "dropout_mask"  # the name remat policies save (lora_jax.models.layer_stack.REMAT_POLICIES)
THRESHOLD_BITS = 16
LEVELS = 1 << THRESHOLD_BITS


def drop_threshold(rate: float) -> int:
    """The 16-bit threshold t: an element is dropped when its 16 random bits are < t, so P(drop) = t / 2**16."""
    return min(LEVELS, max(0, round(rate * LEVELS)))


def keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """Bool mask of `shape`, True (keep) with probability 1 - drop_threshold(rate) / 2**16, i.i.d.

    One 32-bit word of `key`'s generator per two elements: the last axis is split in two halves, the first compared
    through the words' low 16 bits and the second through their high 16 bits (an odd last axis draws one more word
    and drops its unused half)."""
    threshold = drop_threshold(rate)
    if not shape:
        return keep_mask(key, (1,), rate)[0]
    last = shape[-1]
    if last == 0:
        return jnp.zeros(shape, bool)
    half = (last + 1) // 2
    words = jax.random.bits(key, shape[:-1] + (half,), jnp.uint32)
    low = (words & 0xFFFF) >= threshold
    high = (words >> 16) >= threshold
    return jnp.concatenate([low, high], axis=-1)[..., :last]


def apply_dropout(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
    """x with elements dropped at `rate` (as rounded by `drop_threshold`) and the kept ones scaled by
    1 / P(keep), so the expectation is x exactly, in x's dtype."""
    keep_prob = 1.0 - drop_threshold(rate) / LEVELS
    if keep_prob >= 1.0:
        return x
    if keep_prob <= 0.0:
        return jnp.zeros_like(x)
    keep = checkpoint_name(keep_mask(key, x.shape, rate), DROPOUT_MASK)
    return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros_like(x))


class Dropout(nn.Module):
    """`flax.linen.Dropout`'s interface (rate, `deterministic`, rngs collection 'dropout') with the mask above."""

    rate: float
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        return apply_dropout(self.make_rng(self.rng_collection), x, self.rate)
