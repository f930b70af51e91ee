"""LoRA tree transforms and the adapted forward pass, against the fixture's PEFT references."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import lora_jax
from lora_jax.lora import LoraConfig, LoraModel
from tests.conftest import peft_adapter_tree

PEFT_CONFIG = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))


def _logits(model, params, ref, jit=True):
    fn = lambda p: model.apply({"params": p}, ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"])
    return (jax.jit(fn) if jit else fn)(params)


@pytest.fixture(scope="module")
def peft_params(tiny):
    return lora_jax.combine(tiny[1], peft_adapter_tree())


@pytest.mark.parametrize("jit", [True, False])
def test_init_lora_starts_exactly_at_the_base_model(tiny, ref, jit):
    model, params = tiny
    config = LoraConfig(rank=8, alpha=16, targets=("q_proj", "v_proj", "fc1"))
    adapted = lora_jax.init_lora(params, config, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(_logits(LoraModel(model, config), adapted, ref, jit), _logits(model, params, ref, jit))


def test_init_lora_adds_leaves_and_keeps_the_rest(tiny):
    _, params = tiny
    config = LoraConfig(rank=8, targets=("q_proj",), rank_pattern={"decoder/.*/encoder_attn/q_proj": 2})
    adapted = lora_jax.init_lora(params, config, jax.random.PRNGKey(0))
    enc_q = adapted["model"]["encoder"]["layers"]["0"]["self_attn"]["q_proj"]
    cross_q = adapted["model"]["decoder"]["layers"]["1"]["encoder_attn"]["q_proj"]
    assert enc_q["lora_a"].shape == (32, 8) and enc_q["lora_b"].shape == (8, 32)
    assert cross_q["lora_a"].shape == (32, 2)
    assert not np.any(enc_q["lora_b"]) and np.std(enc_q["lora_a"]) > 0
    assert enc_q["kernel"] is params["model"]["encoder"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    base_flat = traverse_util.flatten_dict(params)
    for path, leaf in traverse_util.flatten_dict(adapted).items():
        if path[-1] not in ("lora_a", "lora_b"):
            assert leaf is base_flat[path], path
    assert "lora_a" not in params["model"]["encoder"]["layers"]["0"]["self_attn"]["q_proj"]  # input untouched


@pytest.mark.parametrize("init,expected_std", [("gaussian", 1 / 8), ("kaiming_uniform", (1 / 32**0.5) / 3**0.5)])
def test_a_initialisation(tiny, init, expected_std):
    adapted = lora_jax.init_lora(tiny[1], LoraConfig(rank=8, targets=("fc1", "fc2", "q_proj"), init=init), jax.random.PRNGKey(0))
    a = np.concatenate([np.ravel(v) for p, v in traverse_util.flatten_dict(adapted).items() if p[-1] == "lora_a" and p[-2] != "fc2"])
    assert abs(a.std() - expected_std) / expected_std < 0.1


@pytest.mark.parametrize(
    "targets,match",
    [
        (("qq_proj",), r"matches no module with a 2-D kernel.*'q_proj'"),
        (("layernorm_embedding",), "not a module with a 2-D kernel"),
        (("shared",), "not a module with a 2-D kernel"),
    ],
)
def test_bad_targets_are_explained(tiny, targets, match):
    with pytest.raises(ValueError, match=match):
        lora_jax.init_lora(tiny[1], LoraConfig(targets=targets), jax.random.PRNGKey(0))


def test_bad_config_values():
    with pytest.raises(ValueError, match=r"LoraConfig.rank must be >= 1, got 0"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match=r"LoraConfig.rank_pattern\['q_proj'\] must be an integer, got 2.0 \(float\)"):
        LoraConfig(rank_pattern={"q_proj": 2.0})
    with pytest.raises(ValueError, match="modules_to_save entry 'nope'"):
        lora_jax.init_lora({"d": {"kernel": jnp.ones((2, 2))}}, LoraConfig(targets=("d",), modules_to_save=("nope",)), jax.random.PRNGKey(0))


@pytest.mark.parametrize("jit", [True, False])
def test_peft_adapter_unmerged_matches_peft_logits(tiny, ref, peft_params, jit):
    chex.assert_trees_all_close(_logits(LoraModel(tiny[0], PEFT_CONFIG), peft_params, ref, jit), ref["peft_logits"], atol=1e-4, rtol=0)


def test_merged_matches_peft_and_merged_logits(tiny, ref, peft_params):
    merged = lora_jax.merge_lora(peft_params, PEFT_CONFIG)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(tiny[1])
    logits = _logits(tiny[0], merged, ref)
    chex.assert_trees_all_close(logits, ref["merged_logits"], atol=1e-4, rtol=0)
    chex.assert_trees_all_close(logits, ref["peft_logits"], atol=1e-4, rtol=0)


def test_unmerge_inverts_merge(peft_params):
    merged = lora_jax.merge_lora(peft_params, PEFT_CONFIG)
    back = lora_jax.unmerge_lora(merged, lora_jax.adapter_params(peft_params), PEFT_CONFIG)
    chex.assert_trees_all_close(back, peft_params, atol=1e-6, rtol=0)


def test_merge_by_hand(tiny):
    """W' = W + (alpha/r) A B on one kernel, computed in numpy; rsLoRA uses alpha/sqrt(r)."""
    params = tiny[1]
    for rslora, scale in ((False, 16 / 4), (True, 16 / 2)):
        config = LoraConfig(rank=4, alpha=16, targets=("model/encoder/layers/0/fc1",), use_rslora=rslora)
        adapted = lora_jax.init_lora(params, config, jax.random.PRNGKey(1))
        fc1 = dict(adapted["model"]["encoder"]["layers"]["0"]["fc1"])
        fc1["lora_b"] = jnp.full_like(fc1["lora_b"], 0.01)
        adapted["model"]["encoder"]["layers"]["0"]["fc1"] = fc1
        merged = lora_jax.merge_lora(adapted, config)["model"]["encoder"]["layers"]["0"]["fc1"]["kernel"]
        expected = np.asarray(fc1["kernel"]) + scale * np.asarray(fc1["lora_a"]) @ np.asarray(fc1["lora_b"])
        chex.assert_trees_all_close(merged, expected, atol=1e-6, rtol=0)


def test_adapter_params_and_combine_round_trip(peft_params, tiny):
    config = dataclasses.replace(PEFT_CONFIG, modules_to_save=("final_logits_bias", "layernorm_embedding"))
    adapter = lora_jax.adapter_params(peft_params, config)
    flat = traverse_util.flatten_dict(adapter)
    assert {p[-1] for p in flat} == {"lora_a", "lora_b", "final_logits_bias", "scale", "bias"}
    assert sum(p[-1] == "lora_a" for p in flat) == 12
    chex.assert_trees_all_equal(lora_jax.combine(tiny[1], adapter), peft_params)


def test_count_params_bart_base_q_v_r8(capsys):
    model = lora_jax.BartForConditionalGeneration(lora_jax.bart_base_config())
    ids = jnp.ones((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, ids, ids)["params"])
    config = LoraConfig(rank=8, alpha=16, targets=("q_proj", "v_proj"))
    adapted = jax.eval_shape(lambda p: lora_jax.init_lora(p, config, jax.random.PRNGKey(0)), shapes)
    trainable, total, percent = lora_jax.count_params(adapted, config)
    assert trainable == 442_368  # PEFT's count for bart-base, r=8, q_proj + v_proj
    assert total == 139_470_681 + 442_368 and 0.3 < percent < 0.33
    assert "trainable params: 442,368 ||" in capsys.readouterr().out


class _TinyAttentionBlock(nn.Module):
    """A non-BART model built from nn.Dense: single-head attention + MLP."""

    @nn.compact
    def __call__(self, x):
        q, k, v = (nn.Dense(16, name=n)(x) for n in ("query", "key", "value"))
        att = jax.nn.softmax(q @ k.swapaxes(-1, -2) / 4.0) @ v
        return nn.Dense(8, name="out")(nn.relu(nn.Dense(32, name="mlp")(att)))


def test_lora_on_a_non_bart_model_matches_hand_computation():
    model = _TinyAttentionBlock()
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
    params = model.init(jax.random.PRNGKey(1), x)["params"]
    config = LoraConfig(rank=2, alpha=4, targets=("query", "mlp"))
    adapted = lora_jax.init_lora(params, config, jax.random.PRNGKey(2))
    adapted["mlp"] = {**adapted["mlp"], "lora_b": jnp.ones_like(adapted["mlp"]["lora_b"])}
    adapted["query"] = {**adapted["query"], "lora_b": jnp.ones_like(adapted["query"]["lora_b"])}
    out = jax.jit(lambda p: LoraModel(model, config).apply({"params": p}, x))(adapted)
    # The same model with W + 2·AB folded in by hand.
    by_hand = jax.tree_util.tree_map(lambda a: a, params)
    for name in ("query", "mlp"):
        by_hand[name] = {**params[name], "kernel": params[name]["kernel"] + 2.0 * adapted[name]["lora_a"] @ adapted[name]["lora_b"]}
    chex.assert_trees_all_close(out, model.apply({"params": by_hand}, x), atol=1e-5, rtol=0)
    chex.assert_trees_all_close(model.apply({"params": lora_jax.merge_lora(adapted, config)}, x), out, atol=1e-5, rtol=0)


def test_adapter_dropout_only_with_a_dropout_rng():
    model = _TinyAttentionBlock()
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
    config = LoraConfig(rank=2, targets=("mlp",), dropout=0.5)
    adapted = lora_jax.init_lora(model.init(jax.random.PRNGKey(1), x)["params"], config, jax.random.PRNGKey(2))
    adapted["mlp"] = {**adapted["mlp"], "lora_b": jnp.ones_like(adapted["mlp"]["lora_b"])}
    lm = LoraModel(model, config)
    a = lm.apply({"params": adapted}, x)
    np.testing.assert_array_equal(a, lm.apply({"params": adapted}, x))
    b = lm.apply({"params": adapted}, x, rngs={"dropout": jax.random.PRNGKey(3)})
    assert np.abs(a - b).max() > 1e-3


def test_lora_model_is_hashable_and_forwards_attributes(tiny):
    lm = LoraModel(tiny[0], PEFT_CONFIG)
    assert hash(lm) == hash(LoraModel(tiny[0], PEFT_CONFIG))
    assert lm.config is tiny[0].config
