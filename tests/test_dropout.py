"""lora_jax.dropout: the rate and distribution of its masks (statistical tests with 5-standard-error bounds), its
expectation, its identity cases, and that the 'dots' remat policy keeps the mask instead of drawing it again."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.dropout import LEVELS, Dropout, apply_dropout, drop_threshold, keep_mask
from lora_jax.models.layer_stack import REMAT_POLICIES

KEY = jax.random.key(7, impl="philox4x32")
SHAPE = (64, 8, 127, 65)  # ~4.2M elements; odd last axis: the low / high halves have 33 / 32 columns


def _bound(p: float, n: int) -> float:
    return 5.0 * np.sqrt(p * (1 - p) / n)  # 5 standard errors of a frequency: a false alarm about once in 1.7M


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99])
def test_keep_rate_of_each_half_of_the_random_word(rate):
    """Each half of the 32-bit words (low bits -> the first half of the last axis, high bits -> the second) keeps an
    element with probability 1 - t / 2**16; over seven rates this checks the 16-bit values' distribution function."""
    mask = np.asarray(keep_mask(KEY, SHAPE, rate))
    p = 1 - drop_threshold(rate) / LEVELS
    assert abs(p - (1 - rate)) <= 0.5 / LEVELS
    half = (SHAPE[-1] + 1) // 2
    for part in (mask[..., :half], mask[..., half:]):
        assert abs(part.mean() - p) < _bound(p, part.size), (rate, part.mean(), p)


def test_elements_are_independent():
    """Pairs that share a random word (column j and j + half), neighbours along the last axis and along the batch
    axis: keeping one does not change the chance of keeping the other (joint frequency = p**2 within 5 SE)."""
    rate = 0.3
    mask = np.asarray(keep_mask(KEY, SHAPE, rate))
    p = 1 - drop_threshold(rate) / LEVELS
    half = SHAPE[-1] // 2  # the columns 0..half-1 and half+1.. share words when the last axis is odd
    pairs = {
        "same word": (mask[..., :half], mask[..., half + 1:]),
        "last-axis neighbours": (mask[..., :-1], mask[..., 1:]),
        "batch neighbours": (mask[:-1], mask[1:]),
        "two keys": (mask, np.asarray(keep_mask(jax.random.fold_in(KEY, 1), SHAPE, rate))),
    }
    for name, (a, b) in pairs.items():
        joint = np.mean(a & b)
        assert abs(joint - p * p) < _bound(p * p, a.size), (name, joint, p * p)


def test_dropout_keeps_the_expectation_and_scales_kept_values():
    x = jnp.full(SHAPE, 2.0, jnp.float32)
    y = np.asarray(apply_dropout(KEY, x, 0.1))
    p = 1 - drop_threshold(0.1) / LEVELS
    assert set(np.unique(y).tolist()) == {0.0, np.float32(2.0 / p)}
    assert abs(y.mean() - 2.0) < 2.0 * _bound(p, y.size) / p


def test_identity_cases_and_determinism():
    x = jnp.arange(24.0).reshape(2, 3, 4)
    module = Dropout(0.5)
    rngs = {"dropout": KEY}
    chex.assert_trees_all_equal(module.apply({}, x, deterministic=True, rngs=rngs), x)
    chex.assert_trees_all_equal(Dropout(0.0).apply({}, x, deterministic=False, rngs=rngs), x)
    chex.assert_trees_all_equal(Dropout(1.0).apply({}, x, deterministic=False, rngs=rngs), jnp.zeros_like(x))
    eager = module.apply({}, x, deterministic=False, rngs=rngs)
    jitted = jax.jit(lambda x, k: module.apply({}, x, deterministic=False, rngs={"dropout": k}))(x, KEY)
    chex.assert_trees_all_equal(eager, jitted)
    other = module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.fold_in(KEY, 3)})
    assert not np.array_equal(np.asarray(eager), np.asarray(other))
    assert keep_mask(KEY, (), 0.5).shape == () and keep_mask(KEY, (3, 0), 0.5).shape == (3, 0)


def _random_bit_draws(policy) -> int:
    """How many random-bit draws the gradient program of a rematerialised dropout layer makes."""
    def layer(w, x, key):
        h = apply_dropout(key, jnp.tanh(x @ w), 0.1)
        return apply_dropout(jax.random.fold_in(key, 1), jnp.tanh(h @ w), 0.1)

    remat = jax.checkpoint(layer, policy=policy)
    loss = lambda w, x, key: jnp.sum(remat(w, x, key) ** 2)
    jaxpr = jax.make_jaxpr(jax.grad(loss))(jnp.ones((8, 8)), jnp.ones((4, 8)), KEY)
    return str(jaxpr).count("random_bits")


def test_dots_policy_keeps_the_masks_instead_of_drawing_them_again():
    assert _random_bit_draws(REMAT_POLICIES["dots"]) == 2  # the forward's two draws, none in the backward
    assert _random_bit_draws(REMAT_POLICIES["full"]) == 4  # 'full' keeps nothing: both are drawn again
