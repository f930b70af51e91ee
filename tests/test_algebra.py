"""Adapter algebra against the dense sum of delta weights, sum_i w_i * scale_i * A_i @ B_i (float64, by hand)."""

import chex
import numpy as np
import pytest

import lora_jax
from lora_jax.lora import algebra
from lora_jax.lora.algebra import delta_weights
from tests.multi_helpers import CONFIGS, adapters_for, random_adapter

WEIGHTS = [0.7, -1.3, 2.0]


@pytest.fixture(scope="module")
def three(tiny):
    adapters, configs = adapters_for(tiny[1])
    return [adapters[n] for n in adapters], [configs[n] for n in configs]


def _dense_sum(adapters, configs, weights):
    total = {}
    for adapter, config, w in zip(adapters, configs, weights):
        for module, delta in delta_weights(adapter, config).items():
            total[module] = total.get(module, 0.0) + w * delta
    return total


def _deltas(result):
    return delta_weights(*result)


def test_delta_weights_by_hand(three):
    adapter, config = three[0][0], three[1][0]
    a = np.asarray(adapter["model"]["encoder"]["layers"]["0"]["self_attn"]["q_proj"]["lora_a"], np.float64)
    b = np.asarray(adapter["model"]["encoder"]["layers"]["0"]["self_attn"]["q_proj"]["lora_b"], np.float64)
    np.testing.assert_allclose(delta_weights(adapter, config)["model/encoder/layers/0/self_attn/q_proj"],
                               2.0 * a @ b, rtol=1e-12)  # alpha 8 / r 4


def test_cat_equals_the_dense_sum_and_ranks_add(three):
    adapters, configs = three
    out, config = algebra.cat(adapters, configs, WEIGHTS)
    chex.assert_trees_all_close(_deltas((out, config)), _dense_sum(adapters, configs, WEIGHTS), atol=1e-5)
    # q_proj is adapted by qv4 (r 4) and all2 (r 2); fc1 by all2 and fc8 (r 8); out_proj only by all2.
    assert config.rank_for("model/encoder/layers/0/self_attn/q_proj") == 6
    assert config.rank_for("model/encoder/layers/0/fc1") == 10
    assert config.rank_for("model/decoder/layers/1/fc2") == 5  # 2 + fc8's rank_pattern 3
    assert config.scale_for("model/encoder/layers/0/self_attn/out_proj") == 1.0


@pytest.mark.parametrize("rank", [10, 16])
def test_svd_is_exact_when_the_rank_suffices(three, rank):
    adapters, configs = three
    out, config = algebra.svd(adapters, configs, WEIGHTS, rank=rank)
    assert config.rank == rank and config.scale_for("model/encoder/layers/1/fc2") == 1.0
    # every module's sum has rank <= 10 (4 + 2 on q/v, 2 + 8 on fc1, 2 + 3 on the decoder's fc2, 2 elsewhere)
    chex.assert_trees_all_close(_deltas((out, config)), _dense_sum(adapters, configs, WEIGHTS), atol=1e-5)


def test_svd_truncation_error_is_the_dropped_singular_values(three):
    adapters, configs = three
    dense = _dense_sum(adapters, configs, WEIGHTS)
    got = _deltas(algebra.svd(adapters, configs, WEIGHTS, rank=3))
    for module, delta in dense.items():
        s = np.linalg.svd(delta, compute_uv=False)
        error = np.linalg.norm(got[module] - delta)
        np.testing.assert_allclose(error, np.sqrt((s[3:] ** 2).sum()), rtol=1e-4, atol=1e-5)


def test_linear_is_peft_formula_and_exact_for_one_adapter(tiny, three):
    adapters, configs = three
    single = _deltas(algebra.linear(adapters[:1], configs[:1], [0.4]))
    chex.assert_trees_all_close(single, _dense_sum(adapters[:1], configs[:1], [0.4]), atol=1e-6)
    other = random_adapter(tiny[1], CONFIGS["qv4"], seed=9)
    pair, pair_configs, w = [adapters[0], other], [configs[0]] * 2, [0.5, 1.5]
    out, config = algebra.linear(pair, pair_configs, w)
    module = ("model", "decoder", "layers", "0", "encoder_attn", "v_proj")
    leaf = lambda t, k: np.asarray(t[module[0]][module[1]][module[2]][module[3]][module[4]][module[5]][k], np.float64)
    c = [np.sqrt(wi * 2.0) for wi in w]  # PEFT: sqrt(weight * scale) on both factors; scale = 8 / 4
    expected_a = c[0] * leaf(pair[0], "lora_a") + c[1] * leaf(pair[1], "lora_a")
    expected_b = c[0] * leaf(pair[0], "lora_b") + c[1] * leaf(pair[1], "lora_b")
    np.testing.assert_allclose(leaf(out, "lora_a"), expected_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(leaf(out, "lora_b"), expected_b, rtol=1e-5, atol=1e-6)
    assert config.rank == 4 and config.scale_for("/".join(module)) == 1.0
    with pytest.raises(ValueError, match="equal ranks"):
        algebra.linear(adapters, configs, WEIGHTS)


def test_negate_and_subtract_are_task_vectors(three, tiny, batch):
    adapters, configs = three
    neg = _deltas(algebra.negate(adapters[0], configs[0]))
    chex.assert_trees_all_close(neg, _dense_sum(adapters[:1], configs[:1], [-1.0]), atol=1e-6)
    diff = _deltas(algebra.subtract(adapters[0], configs[0], adapters[1], configs[1]))
    chex.assert_trees_all_close(diff, _dense_sum(adapters[:2], configs[:2], [1.0, -1.0]), atol=1e-5)
    # a combined adapter is an ordinary adapter: adding dW and then -dW gives back the base model's kernels
    model, base = tiny
    both, config = algebra.cat([adapters[0], adapters[0]], [configs[0]] * 2, [1.0, -1.0])
    merged = lora_jax.merge_lora(lora_jax.combine(base, both), config)
    chex.assert_trees_all_close(merged, base, atol=1e-5)


def test_add_weighted_adapter_dispatch(three):
    adapters, configs = three
    with pytest.raises(ValueError, match="needs rank="):
        algebra.add_weighted_adapter(adapters, configs, WEIGHTS, "svd")
    with pytest.raises(ValueError, match="combination_type must be one of"):
        algebra.add_weighted_adapter(adapters, configs, WEIGHTS, "ties")
    with pytest.raises(ValueError, match="one config and one weight per adapter"):
        algebra.cat(adapters, configs, WEIGHTS[:2])
    out = algebra.add_weighted_adapter(adapters, configs, WEIGHTS, "cat")
    chex.assert_trees_all_close(_deltas(out), _dense_sum(adapters, configs, WEIGHTS), atol=1e-5)
