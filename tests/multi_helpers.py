"""Adapters for the multi-adapter tests: non-zero A and B on the tiny fixture, of different ranks, targets, alphas."""

import jax
import numpy as np

import lora_jax
from lora_jax import LoraConfig
from lora_jax.tree import flatten_tree, unflatten_tree

CONFIGS = {
    "qv4": LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj")),
    "all2": LoraConfig(rank=2, alpha=5.0, targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")),
    "fc8": LoraConfig(rank=8, alpha=4.0, targets=("fc1", "fc2"), rank_pattern={"decoder/layers/.*/fc2": 3},
                      use_rslora=True),
}


def random_adapter(base, config, seed, b_std=0.05):
    """An adapter tree with Gaussian A and (unlike a fresh init) non-zero Gaussian B."""
    params = lora_jax.init_lora(base, config, jax.random.PRNGKey(seed))
    flat = flatten_tree(lora_jax.adapter_params(params, config))
    rng = np.random.default_rng(seed)
    for path, value in flat.items():
        if path[-1] == "lora_b":
            flat[path] = (b_std * rng.standard_normal(value.shape)).astype(np.float32)
    return unflatten_tree(flat)


def adapters_for(base, names=tuple(CONFIGS)):
    return {n: random_adapter(base, CONFIGS[n], seed=i + 1) for i, n in enumerate(names)}, {n: CONFIGS[n] for n in names}
