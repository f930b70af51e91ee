"""Untied BART (tie_word_embeddings=False) against the fixture made by transformers 5.23, the tied tree unchanged,
and config settings of other architectures refused (tests/fixtures/interop, scripts/make_interop_fixtures.py)."""

import dataclasses
import json
import os
import shutil

import chex
import jax
import numpy as np
import pytest
from flax import serialization
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

import lora_jax
from lora_jax import sharding
from lora_jax.models.tying import LM_HEAD, UNTIED_LEAVES, untie_embeddings
from lora_jax.tree import flatten_tree
from tests.conftest import MODEL_DIR

INTEROP = os.path.join(os.path.dirname(__file__), "fixtures", "interop")
UNTIED_DIR = os.path.join(INTEROP, "untied")


@pytest.fixture(scope="module")
def iref():
    return dict(np.load(os.path.join(INTEROP, "reference.npz")))


@pytest.fixture(scope="module")
def untied():
    return lora_jax.load_pretrained(UNTIED_DIR)


def _logits(model, params, r, jit=True):
    f = lambda p: model.apply({"params": p}, r["input_ids"], r["attention_mask"], r["decoder_input_ids"])
    return (jax.jit(f) if jit else f)(params)


@pytest.mark.parametrize("jit", [True, False])
def test_untied_logits_match_transformers(untied, iref, jit):
    model, params = untied
    assert model.config.tie_word_embeddings is False
    flat = flatten_tree(params)
    assert all(path in flat for path in UNTIED_LEAVES) and flat[LM_HEAD].shape == (16, 64)
    chex.assert_trees_all_close(_logits(model, params, iref, jit), iref["untied_logits"], atol=1e-4, rtol=0)


def test_tied_fixture_still_matches_and_the_tied_tree_is_unchanged(iref, tiny):
    model, params = lora_jax.load_pretrained(os.path.join(INTEROP, "tied"))
    chex.assert_trees_all_close(_logits(model, params, iref), iref["tied_logits"], atol=1e-4, rtol=0)
    with open(os.path.join(MODEL_DIR, "flax_model.msgpack"), "rb") as f:
        hub_tree = serialization.msgpack_restore(f.read())
    assert set(flatten_tree(tiny[1])) == set(flatten_tree(hub_tree))  # no lm_head, no embed_tokens


@pytest.mark.parametrize("num_beams,key", [(1, "untied_greedy"), (3, "untied_beam3")])
def test_untied_generation_matches_transformers(untied, iref, num_beams, key):
    model, params = untied
    ids = lora_jax.generate(model, params, iref["input_ids"], iref["attention_mask"], num_beams=num_beams,
                            max_new_tokens=8, length_penalty=1.0, early_stopping=True)
    np.testing.assert_array_equal(np.asarray(ids)[:, : iref[key].shape[1]], iref[key])


def test_save_load_round_trip_is_exact(tmp_path, untied):
    model, params = untied
    lora_jax.save_pretrained(str(tmp_path), params, model.config)
    ours, theirs = load_file(str(tmp_path / "model.safetensors")), load_file(os.path.join(UNTIED_DIR, "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)
    assert json.load(open(tmp_path / "config.json"))["tie_word_embeddings"] is False
    for weights in ("flax_model.msgpack", "model.safetensors"):
        back_model, back = lora_jax.load_pretrained(str(tmp_path), weights=weights)
        assert back_model.config.tie_word_embeddings is False
        chex.assert_trees_all_equal(back, params)


def test_transformers_loads_our_untied_save(tmp_path, untied, iref):
    torch = pytest.importorskip("torch", reason="optional: pip install 'lora_jax[torch]' to check against transformers")
    from transformers import BartForConditionalGeneration

    model, params = untied
    lora_jax.save_pretrained(str(tmp_path), params, model.config)
    hf = BartForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        out = hf(**{k: torch.tensor(iref[k]) for k in ("input_ids", "attention_mask", "decoder_input_ids")}).logits
    np.testing.assert_allclose(out.numpy(), iref["untied_logits"], atol=1e-5)


def test_untie_embeddings_keeps_the_outputs_and_saves_untied(tmp_path, tiny, ref):
    model, params = tiny
    untied_params = untie_embeddings(params)
    assert all(path in flatten_tree(untied_params) for path in UNTIED_LEAVES)
    chex.assert_trees_all_close(_logits(model, untied_params, ref), _logits(model, params, ref), atol=1e-6, rtol=0)
    lora_jax.save_pretrained(str(tmp_path), untied_params, model.config)  # the config says tied: the tree wins
    back_model, back = lora_jax.load_pretrained(str(tmp_path))
    assert back_model.config.tie_word_embeddings is False
    chex.assert_trees_all_equal(back, jax.tree_util.tree_map(np.asarray, untied_params))


def test_untied_config_builds_separate_leaves(tiny):
    config = dataclasses.replace(tiny[0].config, tie_word_embeddings=False)
    params = lora_jax.init_params(lora_jax.BartForConditionalGeneration(config), jax.random.PRNGKey(0))
    flat = flatten_tree(params)
    assert all(path in flat for path in UNTIED_LEAVES) and ("model", "shared", "embedding") in flat
    assert not np.array_equal(flat[LM_HEAD].T, flat[("model", "shared", "embedding")])
    assert config.to_hf_dict()["tie_word_embeddings"] is False


def test_untied_leaves_follow_the_fsdp_rule(untied):
    # bart-base's lm_head kernel (D, V) is split along D, as the (V, D) embeddings are (50265 does not divide by 4).
    assert sharding.fsdp_spec((768, 50265), 4) == P(sharding.FSDP, None)
    assert sharding.fsdp_spec((50265, 768), 4) == P(None, sharding.FSDP)
    shardings = sharding.tree_shardings(untied[1], sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1), jax.devices()[:1]))
    assert set(flatten_tree(shardings)) == set(flatten_tree(untied[1]))


def test_tied_config_with_differing_head_warns(tmp_path):
    state = load_file(os.path.join(UNTIED_DIR, "model.safetensors"))
    config = lora_jax.BartConfig.from_pretrained(UNTIED_DIR)
    with pytest.warns(UserWarning, match="tie_word_embeddings=true.*lm_head.weight"):
        lora_jax.params_from_torch_state_dict(state, dataclasses.replace(config, tie_word_embeddings=True))


@pytest.mark.parametrize("key,value", [("model_type", "mbart"), ("normalize_before", True), ("add_bias_logits", True),
                                       ("add_final_layer_norm", True), ("static_position_embeddings", True)])
def test_settings_of_other_architectures_are_refused(tmp_path, key, value):
    shutil.copytree(UNTIED_DIR, tmp_path / "m")
    cfg = json.load(open(tmp_path / "m" / "config.json"))
    cfg[key] = value
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"{key}.*{value!r}|{key} {value!r}"):
        lora_jax.load_pretrained(str(tmp_path / "m"))


def test_old_bart_configs_spelling_out_bart_values_load(tmp_path):
    shutil.copytree(UNTIED_DIR, tmp_path / "m")
    cfg = json.load(open(tmp_path / "m" / "config.json"))
    cfg.update(normalize_before=False, add_final_layer_norm=False, add_bias_logits=False, normalize_embedding=True,
               static_position_embeddings=False, extra_pos_embeddings=2)
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert lora_jax.load_pretrained(str(tmp_path / "m"))[0].config.tie_word_embeddings is False


def test_unknown_activation_is_refused_at_load(tmp_path):
    shutil.copytree(UNTIED_DIR, tmp_path / "m")
    cfg = json.load(open(tmp_path / "m" / "config.json"))
    cfg["activation_function"] = "mish"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="activation_function 'mish'"):
        lora_jax.load_pretrained(str(tmp_path / "m"))
