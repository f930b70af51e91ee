"""The pieces every decoding loop shares: encoding once, one decoder step over the key/value cache, and the beam
bookkeeping helpers (gathering beams, reordering the cache, length-penalty denominators)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NEG = -1.0e9  # transformers' "very negative" score for impossible beams


def encode_and_cache(model, params, input_ids, attention_mask, beams: int, length: int):
    """Encodes once; the cross-attention keys/values stay one row per input, shared by its `beams` hypotheses
    (the decoder folds the beams into the query axis), so they are neither copied nor re-read per beam."""
    variables = {"params": params}
    encoded = model.apply(variables, input_ids, attention_mask, method="encode")
    return model.apply(variables, encoded, length, beams, method="init_cache")


def step_logits(model, params, tokens, attention_mask, cache):
    logits, cache = model.apply({"params": params}, tokens[:, None], None, attention_mask, cache=cache, method="decode")
    return logits[:, -1, :].astype(jnp.float32), cache


def gather(x: jax.Array, index: jax.Array) -> jax.Array:
    """x (B, K, ...) gathered along axis 1 with index (B, K')."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def reorder_cache(cache, flat_index: jax.Array):
    """Gathers every batched leaf of each layer's self-attention cache by hypothesis (flat_index (B*K,)).

    Cross-attention K/V are left alone: they hold one row per input, shared by all of its beams, and beams never
    move between inputs."""
    take = lambda x: x[flat_index] if x.ndim else x
    return [{**layer, "self": jax.tree_util.tree_map(take, layer["self"])} for layer in cache]


def length_penalty_table(length: int, length_penalty: float) -> jax.Array:
    """(length + 1,) float32 with entry n = n ** length_penalty.

    transformers divides float32 scores by the Python float `n ** length_penalty`, which torch rounds to float32;
    computing the powers in float64 on the host and rounding them reproduces that division bit for bit (a float32
    power inside the loop can differ in the last bit for non-integer penalties, and flip near-tied beams)."""
    return jnp.asarray(np.array([float(n) ** length_penalty if n else 1.0 for n in range(length + 1)], np.float32))
