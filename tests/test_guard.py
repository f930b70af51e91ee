"""The divergence guard: non-finite steps skipped on device and counted; the host's rules for stopping a run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from lora_jax.lora import LoraConfig
from train.guard import (OUTLIER_PATIENCE, GuardSettings, all_finite, divergence, guard_optimizer, loss_outlier, remember,
                         skipped_counts)

CONFIG = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))
SETTINGS = GuardSettings(max_nonfinite_steps=3, divergence_factor=3.0)


@pytest.mark.parametrize("jit", [True, False])
def test_a_non_finite_step_is_skipped_and_counted(tiny, batch, jit):
    model, params = tiny
    adapted = lora_jax.init_lora(params, CONFIG, jax.random.PRNGKey(0))
    tx = guard_optimizer(lora_jax.lora_optimizer(optax.adamw(1e-2), CONFIG))
    step = lora_jax.make_train_step(model, CONFIG, max_grad_norm=1.0, jit=jit)
    state = lora_jax.create_train_state(adapted, CONFIG, tx)
    state, _ = step(state, batch, jax.random.PRNGKey(1))  # a good step: applied
    good = jax.tree_util.tree_map(np.array, state.trainable)
    bad_batch = dict(batch)
    poisoned = state.frozen["model"]["shared"]["embedding"].at[5].set(jnp.nan)
    frozen = jax.tree_util.tree_map(lambda x: x, state.frozen)
    frozen["model"]["shared"]["embedding"] = poisoned
    bad_state = state.replace(frozen=frozen)
    for expected in (1, 2):
        bad_state, metrics = step(bad_state, bad_batch, jax.random.PRNGKey(2))
        assert not bool(metrics["finite"]) and not np.isfinite(float(metrics["loss"]))
        jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.array, bad_state.trainable), good)
        assert skipped_counts(bad_state.opt_state) == (expected, expected)
    healed = bad_state.replace(frozen=state.frozen)
    healed, metrics = step(healed, batch, jax.random.PRNGKey(3))
    assert bool(metrics["finite"]) and skipped_counts(healed.opt_state) == (0, 2)
    assert all_finite(healed.trainable) and not all_finite({"x": jnp.array([1.0, jnp.inf])})
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(healed.trainable),
                                                       jax.tree_util.tree_leaves(good)))


def test_too_many_skipped_steps_in_a_row_stop_the_run():
    assert divergence(SETTINGS, 2, 0, None) is None
    reason = divergence(SETTINGS, 3, 0, None)
    assert "3 steps in a row" in reason and "train.max_nonfinite_steps" in reason


def test_a_loss_far_above_its_running_median_is_an_outlier():
    history = (5.0, 4.0, 3.0, 2.5)  # median 3.5
    assert loss_outlier(SETTINGS, 10.0, history) is None  # 10 < 3 x 3.5
    assert "above 3 x the median 3.5" in loss_outlier(SETTINGS, 10.6, history)
    assert loss_outlier(SETTINGS, 0.5, (0.02, 0.01)) is None  # 25x a near-zero median, but not 1 nat above it
    assert loss_outlier(SETTINGS, 99.0, (2.0,)) is None  # too little history to judge
    assert loss_outlier(GuardSettings(3, None), 99.0, history) is None  # the loss rule can be turned off
    assert loss_outlier(SETTINGS, float("nan"), history) is None  # non-finite losses are the skip counter's


def test_only_outliers_at_several_checks_in_a_row_stop_the_run():
    outlier = loss_outlier(SETTINGS, 10.6, (5.0, 4.0, 3.0, 2.5))
    assert divergence(SETTINGS, 0, OUTLIER_PATIENCE - 1, outlier) is None  # one hard batch does not stop a run
    assert "checks in a row" in divergence(SETTINGS, 0, OUTLIER_PATIENCE, outlier)


def test_only_finite_losses_enter_the_history():
    assert remember((1.0,), float("nan")) == (1.0,) and remember((1.0,), float("inf")) == (1.0,)
    assert remember(tuple(range(20)), 7.0)[-1] == 7.0 and len(remember(tuple(map(float, range(20))), 7.0)) == 20
