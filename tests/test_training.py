"""The masked optimizer and the train step: what changes, what does not, and what XLA computes."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import lora_jax
from lora_jax.lora import LoraConfig
from lora_jax.lora.optim import param_labels, state_bytes

CONFIG = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))


def _state(params, config=CONFIG, tx=None, full=False, **kw):
    tx = tx or lora_jax.lora_optimizer(optax.adamw(1e-2), config, full_finetune=full)
    adapted = params if full else lora_jax.init_lora(params, config, jax.random.PRNGKey(0))
    return lora_jax.create_train_state(adapted, config, tx, full_finetune=full)


def _tree_bytes(tree):
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))


def test_loss_matches_torch_loss(tiny, batch, ref):
    model, params = tiny
    logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
    losses, mask = lora_jax.token_losses(logits, batch["labels"])
    chex.assert_trees_all_close(losses.sum() / mask.sum(), np.float32(ref["torch_loss"]), atol=1e-5, rtol=0)


def test_label_smoothing_by_hand():
    # Two classes, logits (0, ln 3): p = (1/4, 3/4). Target 1, e = 0.1:
    # nll = -ln(3/4) = 0.287682; smooth = mean(-ln p) = (ln 4 + ln(4/3)) / 2 = 0.836988
    # loss = 0.9 * 0.287682 + 0.1 * 0.836988 = 0.342613. The -100 token is not counted.
    logits = jnp.array([[[0.0, np.log(3.0)], [5.0, 0.0]]])
    losses, mask = lora_jax.token_losses(logits, jnp.array([[1, -100]]), label_smoothing=0.1)
    np.testing.assert_allclose(losses, [[0.342613, 0.0]], atol=1e-6)
    np.testing.assert_array_equal(mask, [[1.0, 0.0]])


def test_optimizer_state_only_for_trainable_leaves(tiny):
    _, params = tiny
    adapted = lora_jax.init_lora(params, CONFIG, jax.random.PRNGKey(0))
    tx = lora_jax.lora_optimizer(optax.adam(1e-3), CONFIG)
    adapter_bytes = _tree_bytes(lora_jax.adapter_params(adapted))
    full_tree_state = tx.init(adapted)  # the same optimizer over the whole tree
    assert abs(state_bytes(full_tree_state) - 2 * adapter_bytes) <= 64
    updates, _ = tx.update(jax.tree_util.tree_map(jnp.ones_like, adapted), full_tree_state, adapted)
    flat = traverse_util.flatten_dict(updates)
    assert all(not np.any(v) for p, v in flat.items() if p[-1] not in ("lora_a", "lora_b"))
    assert all(np.any(v) for p, v in flat.items() if p[-1] in ("lora_a", "lora_b"))


def test_loraplus_gives_b_its_own_learning_rate(tiny):
    _, params = tiny
    adapted = lora_jax.init_lora(params, CONFIG, jax.random.PRNGKey(0))
    labels = traverse_util.flatten_dict(param_labels(adapted, CONFIG, loraplus=True))
    assert {labels[p] for p in labels if p[-1] == "lora_b"} == {"lora_b"}
    tx = lora_jax.lora_optimizer(optax.sgd, CONFIG, learning_rate=0.1, loraplus_lr_ratio=16.0)
    ones = jax.tree_util.tree_map(jnp.ones_like, adapted)
    updates, _ = tx.update(ones, tx.init(adapted), adapted)
    q = updates["model"]["encoder"]["layers"]["0"]["self_attn"]["q_proj"]
    np.testing.assert_allclose(q["lora_a"], -0.1)
    np.testing.assert_allclose(q["lora_b"], -1.6)
    with pytest.raises(ValueError, match="LoRA\\+ needs a factory"):
        lora_jax.lora_optimizer(optax.sgd(0.1), CONFIG, loraplus_lr_ratio=16.0)


def test_twenty_lora_steps_train_only_the_adapters(tiny, batch):
    model, params = tiny
    frozen_before = jax.tree_util.tree_map(np.array, params)
    state = _state(params)
    a0 = jax.tree_util.tree_map(np.array, state.trainable)
    step = lora_jax.make_train_step(model, CONFIG, max_grad_norm=1.0)
    losses = []
    for _ in range(20):
        state, metrics = step(state, batch, jax.random.PRNGKey(1))
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-5:]) < losses[0]
    chex.assert_trees_all_equal(state.frozen, lora_jax.split_trainable(frozen_before, CONFIG)[1])
    chex.assert_trees_all_equal(params, frozen_before)  # the caller's tree is still valid and unchanged
    for before, after in zip(jax.tree_util.tree_leaves(a0), jax.tree_util.tree_leaves(state.trainable)):
        assert np.abs(before - after).max() > 0
    assert abs(state_bytes(state.opt_state) - 2 * _tree_bytes(state.trainable)) <= 64
    assert step.num_compilations() == 1


def test_train_update_is_a_pure_function_to_jit_yourself(tiny_no_dropout, batch):
    """jax.jit(partial(train_update, ...)) as in the Flax examples gives make_train_step's update and metrics."""
    model, params = tiny_no_dropout
    settings = dict(max_grad_norm=0.5, grad_accum_steps=2, dropout_rng_impl=None)
    update = jax.jit(functools.partial(lora_jax.train_update, model=lora_jax.with_lora(model, CONFIG), **settings))
    s_own, m_own = update(_state(params), batch, jax.random.PRNGKey(0))
    s_lib, m_lib = lora_jax.make_train_step(model, CONFIG, **settings)(_state(params), batch, jax.random.PRNGKey(0))
    assert int(s_own.step) == int(s_lib.step) == 1
    chex.assert_trees_all_close(s_own.trainable, s_lib.trainable, atol=1e-6, rtol=0)
    chex.assert_trees_all_close(m_own, m_lib, atol=1e-6, rtol=1e-6)


def test_num_compilations_counts_each_new_shape(tiny_no_dropout, batch):
    model, params = tiny_no_dropout
    step = lora_jax.make_train_step(model, CONFIG)
    state, _ = step(_state(params), batch, jax.random.PRNGKey(0))
    state, _ = step(state, batch, jax.random.PRNGKey(0))
    assert step.num_compilations() == 1
    shorter = {k: v[:, :-1] if k in ("decoder_input_ids", "labels") else v for k, v in batch.items()}
    step(state, shorter, jax.random.PRNGKey(0))
    assert step.num_compilations() == 2
    assert lora_jax.make_train_step(model, CONFIG).num_compilations() == 0  # counts are per step function


def test_jitted_and_unjitted_steps_agree(tiny_no_dropout, batch):
    model, params = tiny_no_dropout
    s_jit, m_jit = lora_jax.make_train_step(model, CONFIG, max_grad_norm=0.5)(_state(params), batch, jax.random.PRNGKey(0))
    s_py, m_py = lora_jax.make_train_step(model, CONFIG, max_grad_norm=0.5, jit=False)(_state(params), batch, jax.random.PRNGKey(0))
    chex.assert_trees_all_close(s_jit.trainable, s_py.trainable, atol=1e-6, rtol=0)
    chex.assert_trees_all_close(m_jit, m_py, atol=1e-5, rtol=1e-5)


def test_gradient_accumulation_equals_full_batch(tiny_no_dropout, batch):
    model, params = tiny_no_dropout
    sgd = lora_jax.lora_optimizer(optax.sgd(1.0), CONFIG)
    full, m1 = lora_jax.make_train_step(model, CONFIG)(_state(params, tx=sgd), batch, jax.random.PRNGKey(0))
    acc, m2 = lora_jax.make_train_step(model, CONFIG, grad_accum_steps=2)(_state(params, tx=sgd), batch, jax.random.PRNGKey(0))
    chex.assert_trees_all_close(full.trainable, acc.trainable, atol=1e-6, rtol=0)
    chex.assert_trees_all_close(m1["loss"], m2["loss"], atol=1e-6, rtol=0)


def test_full_finetuning_through_the_same_path(tiny, batch):
    model, params = tiny
    state = _state(params, config=None, full=True)
    assert state.frozen == {}
    state, metrics = lora_jax.make_train_step(model, None)(state, batch, jax.random.PRNGKey(0))
    changed = [np.abs(a - b).max() > 0 for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(state.params))]
    assert np.mean(changed) > 0.9
    assert state_bytes(state.opt_state) >= 2 * _tree_bytes(params)


def _flops(model, config, full, batch):
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])["params"])
    real = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    state = _state(real, config=None if full else config, full=full)
    step = lora_jax.make_train_step(model, None if full else config, jit=False)
    compiled = jax.jit(step).lower(state, batch, jax.random.PRNGKey(0)).compile()
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_lora_step_skips_frozen_gradients_in_flops():
    config = lora_jax.BartConfig(
        vocab_size=4000, d_model=256, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024, max_position_embeddings=128,
    )
    model = lora_jax.BartForConditionalGeneration(config)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(5, 4000, (2, 64)), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "decoder_input_ids": ids[:, :32], "labels": ids[:, :32]}
    lora = LoraConfig(rank=8, alpha=16, targets=("q_proj", "v_proj"))
    ratio = _flops(model, lora, False, batch) / _flops(model, lora, True, batch)
    assert ratio <= 0.7, ratio


def test_remat_lora_step_matches_plain_step(tiny, batch):
    """A LoRA step through rematerialised layers (adapters intercepted inside nn.remat, dropout on) gives the same
    loss and updated adapters as the plain model."""
    model, params = tiny
    results = []
    for m in (model, model.clone(remat="dots"), model.clone(remat="full")):
        step = lora_jax.make_train_step(m, CONFIG)
        state, metrics = step(_state(params), batch, jax.random.PRNGKey(4))
        results.append((metrics["loss"], state.trainable))
    for got in results[1:]:
        chex.assert_trees_all_close(got, results[0], atol=1e-6, rtol=1e-5)


def test_default_dropout_rng_is_philox_when_available():
    impl = lora_jax.training.default_dropout_rng_impl()
    assert impl in lora_jax.training.PREFERRED_DROPOUT_RNG
    bits = jax.random.bernoulli(jax.random.key(0, impl=impl), 0.9, (200_000,))
    assert abs(float(bits.mean()) - 0.9) < 0.005  # keep rate of a 0.1 dropout mask
