"""`jax.nn.dot_product_attention` and the scanned layer stack against the explicit, unrolled reference path.

Tolerances: logits within 2e-5 absolute (fp32 on the fixture: logits of magnitude ~1, the two paths only reorder
sums); gradients within 1e-4 x the largest gradient entry. The k_proj biases get no true gradient (softmax ignores a
constant added to every key's logit), so their entries are pure rounding noise, which that absolute bound covers.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax.generation import generate
from lora_jax.models.attention import BartAttention
from lora_jax.models.layer_stack import STACKED, stack_layers, unstack_layers
from tests.test_generation import GREEDY

LORA = lora_jax.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "fc1"))
LOGIT_ATOL = 2e-5
GRAD_RTOL_OF_MAX = 1e-4


@pytest.fixture(scope="module")
def adapted(tiny):
    """(explicit unrolled model, params with non-zero adapters) so adapters change the output."""
    model, params = tiny
    params = lora_jax.init_lora(params, LORA, jax.random.PRNGKey(0))
    flat = jax.tree_util.tree_flatten_with_path(params)
    leaves = [x + 0.02 if "lora_b" in jax.tree_util.keystr(path) else x for path, x in flat[0]]
    return model.clone(attention="explicit"), jax.tree_util.tree_unflatten(flat[1], leaves)


def _inputs(ref, decoder_padding: bool):
    """The fixture batch (two rows with source padding); optionally the last 5 decoder tokens of row 0 padded."""
    dec_mask = np.ones_like(ref["decoder_input_ids"])
    if decoder_padding:
        dec_mask[0, -5:] = 0
    return ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"], jnp.asarray(dec_mask)


def _logits_and_grads(model, params, inputs, jit):
    lora_model = lora_jax.LoraModel(model, LORA)
    loss = lambda p: (lora_model.apply({"params": p}, *inputs) ** 2).mean()
    logits = lambda p: lora_model.apply({"params": p}, *inputs)
    grad = jax.grad(loss)
    if jit:
        logits, grad = jax.jit(logits), jax.jit(grad)
    return logits(params), grad(params)


def _assert_same(got, want):
    chex.assert_trees_all_close(got[0], want[0], atol=LOGIT_ATOL, rtol=0)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(want[1]))
    chex.assert_trees_all_close(got[1], want[1], atol=GRAD_RTOL_OF_MAX * scale, rtol=0)


VARIANTS = {
    "dot_product_attention": dict(attention=None),
    "dot_product_attention xla": dict(attention="xla"),
    "scan, explicit attention": dict(attention="explicit", scan_layers=True),
    "scan + dot_product_attention": dict(scan_layers=True),
    "scan + dot_product_attention + remat dots": dict(scan_layers=True, remat="dots"),
    "scan + remat full": dict(scan_layers=True, remat="full"),
}


CASES = [(v, True, True) for v in VARIANTS] + [  # jitted with decoder padding; un-jitted and no decoder mask below
    ("scan + dot_product_attention", False, True), ("dot_product_attention", False, False),
    ("scan + dot_product_attention + remat dots", True, False),
]


@pytest.mark.parametrize("variant,jit,decoder_padding", CASES)
def test_variant_equals_explicit_unrolled(adapted, ref, variant, jit, decoder_padding):
    """Encoder self-attention with padding, decoder causal (+ padding) self-attention and cross-attention all sit
    in the forward pass; the gradient reaches every adapter and frozen leaf through each of them."""
    model, params = adapted
    inputs = _inputs(ref, decoder_padding)
    want = _logits_and_grads(model, params, inputs, jit)
    got = _logits_and_grads(model.clone(**VARIANTS[variant]), params, inputs, jit)
    _assert_same(got, want)


def test_scanned_model_still_matches_transformers(tiny, ref):
    model, params = tiny
    logits = jax.jit(lambda p: model.clone(scan_layers=True).apply({"params": p}, ref["input_ids"], ref["attention_mask"],
                                                                   ref["decoder_input_ids"]))(params)
    chex.assert_trees_all_close(logits, ref["torch_logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_generation_ids_identical_on_every_path(tiny, ref, num_beams):
    model, params = tiny
    settings = {**GREEDY, "num_beams": num_beams, "length_penalty": 1.0}
    want = generate(model.clone(attention="explicit"), params, ref["input_ids"], ref["attention_mask"],
                    generation_config=settings)
    for variant in ({}, {"scan_layers": True}, {"scan_layers": True, "attention": "xla"}):
        got = generate(model.clone(**variant), params, ref["input_ids"], ref["attention_mask"], generation_config=settings)
        np.testing.assert_array_equal(got, want, err_msg=str(variant))


def test_attention_module_paths(tiny):
    """Directly on one module: the fused and explicit paths agree for self- and cross-attention with a padding
    bias; attention dropout in training and a decode cache take the explicit path."""
    config = dataclasses.replace(tiny[0].config, attention_dropout=0.1)
    x, kv = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 32)), jax.random.normal(jax.random.PRNGKey(2), (2, 7, 32))
    bias = lora_jax.models.attention.padding_bias(jnp.array([[1] * 7, [1] * 4 + [0] * 3]))
    fused, explicit = BartAttention(config, 4), BartAttention(config, 4, attention="explicit")
    params = fused.init(jax.random.PRNGKey(0), x, bias, kv_states=kv)
    for kv_states in (None, kv):
        b = bias if kv_states is not None else bias[..., :5]
        out = fused.apply(params, x, b, kv_states=kv_states)[0]
        chex.assert_trees_all_close(out, explicit.apply(params, x, b, kv_states=kv_states)[0], atol=1e-6, rtol=0)
    assert fused.uses_fused(cached=False, deterministic=True)
    assert not fused.uses_fused(cached=False, deterministic=False)  # attention dropout 0.1 in training
    assert not fused.uses_fused(cached=True, deterministic=True)
    assert not explicit.uses_fused(cached=False, deterministic=True)


def test_unknown_attention_is_refused(tiny, ref):
    with pytest.raises(ValueError, match="attention='flash' is not supported"):
        tiny[0].clone(attention="flash").apply({"params": tiny[1]}, ref["input_ids"], ref["attention_mask"],
                                               ref["decoder_input_ids"])


def _layer_scannable(model, params, ref) -> bool:
    # LayerStack.scannable, read on the bound encoder stack.
    def probe(module):
        return module.model.encoder.layers.scannable()

    return model.apply({"params": params}, method=probe)


def test_scan_falls_back_when_layers_differ(tiny, ref):
    """Adapters on layer 0 only: the layers' trees differ, so the stack runs unrolled (same result)."""
    model, params = tiny
    config = lora_jax.LoraConfig(rank=2, alpha=4, targets=("encoder/layers/0/self_attn/q_proj",))
    adapted = lora_jax.init_lora(params, config, jax.random.PRNGKey(0))
    scanned = model.clone(scan_layers=True)
    assert _layer_scannable(scanned, params, ref)
    assert not _layer_scannable(scanned, adapted, ref)
    args = (ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"])
    got = lora_jax.LoraModel(scanned, config).apply({"params": adapted}, *args)
    want = lora_jax.LoraModel(model, config).apply({"params": adapted}, *args)
    chex.assert_trees_all_close(got, want, atol=LOGIT_ATOL, rtol=0)


# Per-path scales and ranks under a scan (issue 24): an alpha on one layer only, a rank on one layer only (the scan
# pads it), a rank for every fc1 (PEFT-style module name).
PATTERNS = {
    "alpha on layer 1": dict(targets=("q_proj",), alpha_pattern={"layers/1/self_attn/q_proj": 40.0}),
    "rank on layer 0": dict(targets=("q_proj", "fc1"), rank_pattern={"encoder/layers/0/fc1": 5}, use_rslora=True),
    "rank for fc1": dict(targets=("q_proj", "fc1"), rank_pattern={"fc1": 8}, alpha_pattern={"q_proj": 3.0}),
}


@pytest.mark.parametrize("name", PATTERNS)
def test_per_path_scales_and_ranks_are_scanned(tiny, ref, name):
    """Pattern keys with scanned layers: the scan runs (the per-layer scales are data it carries, uneven ranks are
    zero-padded), with per-layer or pre-stacked frozen weights, and gives the unrolled model's logits."""
    model, params = tiny
    config = lora_jax.LoraConfig(rank=2, alpha=4, **PATTERNS[name])
    adapted = jax.tree_util.tree_map(lambda x: x + 0.05, lora_jax.init_lora(params, config, jax.random.PRNGKey(0)))
    args = (ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"])
    scanned = lora_jax.LoraModel(model.clone(scan_layers=True), config)
    assert scanned.apply({"params": adapted, "lora_scales": lora_jax.lora.apply.scale_tree(adapted, config)},
                         method=lambda m: m.model.encoder.layers.scannable())
    want = lora_jax.LoraModel(model, config).apply({"params": adapted}, *args)
    trainable, frozen = lora_jax.split_trainable(adapted, config)
    for tree in (adapted, lora_jax.combine(stack_layers(frozen), trainable)):
        got = jax.jit(lambda p: scanned.apply({"params": p}, *args))(tree)
        chex.assert_trees_all_close(got, want, atol=LOGIT_ATOL, rtol=0)


def test_scanned_train_step_matches_unrolled_without_dropout(tiny_no_dropout, batch):
    """Three optimizer steps through make_train_step (jitted, donated state): same losses and adapters."""
    import optax

    model, params = tiny_no_dropout
    adapted = lora_jax.init_lora(params, LORA, jax.random.PRNGKey(0))
    results = []
    variants = ((model.clone(attention="explicit"), False), (model.clone(scan_layers=True, remat="dots"), False),
                (model.clone(scan_layers=True, remat="dots"), True))
    for m, stacked in variants:
        tx = lora_jax.lora_optimizer(optax.adamw(1e-2), LORA)
        state = lora_jax.create_train_state(adapted, LORA, tx, stack_layers=stacked)
        if stacked:  # the frozen weights really are held pre-stacked
            assert set(state.frozen["model"]["encoder"]["layers"]) == {STACKED}
        step = lora_jax.make_train_step(m, LORA)
        losses = []
        for _ in range(3):
            state, metrics = step(state, batch, jax.random.PRNGKey(1))
            losses.append(float(metrics["loss"]))
        results.append((np.array(losses), state.trainable))
    for got in results[1:]:
        np.testing.assert_allclose(got[0], results[0][0], rtol=1e-5)
        # Adam divides by sqrt(v): a rounding-level gradient difference moves an entry by up to ~lr * 1e-2.
        chex.assert_trees_all_close(got[1], results[0][1], atol=1e-4, rtol=0)
    # pre-stacking changes where the frozen weights live, not what is computed
    chex.assert_trees_all_close(results[2], results[1], atol=1e-6, rtol=0)
    assert jax.tree_util.tree_structure(state.params) == jax.tree_util.tree_structure(adapted)


def test_stack_layers_round_trip_and_scanned_forward(adapted, ref):
    """stack_layers / unstack_layers are inverse (exact); a scanned model reads pre-stacked weights, alone or with
    per-layer adapter leaves beside them, and gives the per-layer tree's logits; an unrolled model refuses them."""
    model, params = adapted
    stacked = stack_layers(params)
    layers = stacked["model"]["decoder"]["layers"]
    assert set(layers) == {STACKED}
    assert layers[STACKED]["fc1"]["kernel"].shape == (2,) + params["model"]["decoder"]["layers"]["0"]["fc1"]["kernel"].shape
    chex.assert_trees_all_equal(unstack_layers(stacked), params)
    frozen, trainable = lora_jax.split_trainable(params, LORA)[1], lora_jax.split_trainable(params, LORA)[0]
    beside = lora_jax.combine(stack_layers(frozen), trainable)  # frozen stacked, adapters per layer
    chex.assert_trees_all_equal(unstack_layers(beside), params)
    inputs = _inputs(ref, decoder_padding=False)
    want = _logits_and_grads(model, params, inputs, jit=True)[0]
    scanned = model.clone(scan_layers=True)
    for tree in (stacked, beside):
        got = jax.jit(lambda p: lora_jax.LoraModel(scanned, LORA).apply({"params": p}, *inputs))(tree)
        chex.assert_trees_all_close(got, want, atol=LOGIT_ATOL, rtol=0)
    with pytest.raises(ValueError, match="pre-stacked layers.*scan_layers=True"):
        lora_jax.LoraModel(model, LORA).apply({"params": stacked}, *inputs)


def test_pre_stacked_layers_beside_uneven_per_layer_leaves(tiny, ref):
    """Adapters on one layer only beside pre-stacked frozen weights: no scan can combine them, so each layer runs on
    its slice of the stacked weights, and the logits are the per-layer tree's."""
    model, params = tiny
    config = lora_jax.LoraConfig(rank=2, alpha=4, targets=("encoder/layers/0/self_attn/q_proj",))
    adapted = jax.tree_util.tree_map(lambda x: x + 0.05, lora_jax.init_lora(params, config, jax.random.PRNGKey(0)))
    trainable, frozen = lora_jax.split_trainable(adapted, config)
    args = (ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"])
    got = lora_jax.LoraModel(model.clone(scan_layers=True), config).apply(
        {"params": lora_jax.combine(stack_layers(frozen), trainable)}, *args)
    want = lora_jax.LoraModel(model, config).apply({"params": adapted}, *args)
    chex.assert_trees_all_close(got, want, atol=LOGIT_ATOL, rtol=0)
