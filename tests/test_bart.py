"""The Flax BART against the fixture's transformers-4.57 references (PyTorch and Flax)."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file

import lora_jax
from lora_jax.models.bart import BartForConditionalGeneration, init_params, shift_tokens_right

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny-bart")
MODEL_DIR = os.path.join(FIXTURE, "model")


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(os.path.join(FIXTURE, "reference.npz")))


@pytest.fixture(scope="module", params=["flax_model.msgpack", "model.safetensors"])
def loaded(request):
    return lora_jax.load_pretrained(MODEL_DIR, weights=request.param)


def _logits(model, params, ref, jit):
    fn = lambda p, a, m, d: model.apply({"params": p}, a, m, d)
    fn = jax.jit(fn) if jit else fn
    return fn(params, ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"])


@pytest.mark.parametrize("jit", [True, False])
def test_logits_match_torch_and_flax(loaded, ref, jit):
    model, params = loaded
    logits = _logits(model, params, ref, jit)
    chex.assert_trees_all_close(logits, ref["torch_logits"], atol=1e-4, rtol=0)
    chex.assert_trees_all_close(logits, ref["flax_logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("jit", [True, False])
def test_encoder_output_matches_torch(loaded, ref, jit):
    model, params = loaded
    fn = lambda p: model.apply({"params": p}, ref["input_ids"], ref["attention_mask"], method="encode")
    out = (jax.jit(fn) if jit else fn)(params)
    chex.assert_trees_all_close(out, ref["torch_encoder_last_hidden_state"], atol=1e-5, rtol=0)


def test_loss_matches_torch(loaded, ref):
    model, params = loaded
    logits = _logits(model, params, ref, jit=True)
    labels = ref["labels"]
    mask = labels != -100
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, np.where(mask, labels, 0)[..., None], axis=-1)[..., 0]
    loss = (nll * mask).sum() / mask.sum()
    chex.assert_trees_all_close(loss, np.float32(ref["torch_loss"]), atol=1e-5, rtol=0)


def test_shift_tokens_right_matches_fixture(ref):
    shifted = shift_tokens_right(jnp.asarray(ref["labels"]), pad_token_id=1, decoder_start_token_id=2)
    np.testing.assert_array_equal(shifted, ref["decoder_input_ids"])


def test_cached_decoding_matches_full_decode(loaded, ref):
    model, params = loaded
    v = {"params": params}
    enc = model.apply(v, ref["input_ids"], ref["attention_mask"], method="encode")
    cache = model.apply(v, enc, 32, method="init_cache")
    step = jax.jit(lambda tok, c: model.apply(v, tok, None, ref["attention_mask"], cache=c, method="decode"))
    dec = ref["decoder_input_ids"]
    outs = []
    for t in range(dec.shape[1]):
        logits, cache = step(dec[:, t : t + 1], cache)
        outs.append(logits)
    chex.assert_trees_all_close(jnp.concatenate(outs, 1), ref["torch_logits"], atol=1e-4, rtol=0)


def test_flax_and_safetensors_give_the_same_params():
    _, a = lora_jax.load_pretrained(MODEL_DIR, weights="flax_model.msgpack")
    _, b = lora_jax.load_pretrained(MODEL_DIR, weights="model.safetensors")
    chex.assert_trees_all_close(a, b, atol=1e-6, rtol=0)


def test_save_load_round_trip_is_exact(tmp_path, loaded):
    model, params = loaded
    lora_jax.save_pretrained(str(tmp_path), params, model.config, tokenizer_dir=MODEL_DIR)
    for weights in ("flax_model.msgpack", "model.safetensors"):
        _, back = lora_jax.load_pretrained(str(tmp_path), weights=weights)
        chex.assert_trees_all_equal(back, params)
    ours = load_file(str(tmp_path / "model.safetensors"))
    theirs = load_file(os.path.join(MODEL_DIR, "model.safetensors"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert lora_jax.load_tokenizer(str(tmp_path))("hello").input_ids[0] == 0


@pytest.mark.parametrize("alias", ["model.encoder.embed_tokens.weight", "lm_head.weight"])
def test_tied_embedding_key_variants(alias):
    state = load_file(os.path.join(MODEL_DIR, "model.safetensors"))
    config = lora_jax.BartConfig.from_pretrained(MODEL_DIR)
    base = lora_jax.params_from_torch_state_dict(state, config)
    state[alias] = state.pop("model.shared.weight")
    variant = lora_jax.params_from_torch_state_dict(state, config)
    chex.assert_trees_all_equal(variant, base)


def test_duplicated_embedding_keys_are_accepted(recwarn):
    state = load_file(os.path.join(MODEL_DIR, "model.safetensors"))
    for key in ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"):
        state[key] = state["model.shared.weight"]
    lora_jax.params_from_torch_state_dict(state, lora_jax.BartConfig.from_pretrained(MODEL_DIR))
    assert not [w for w in recwarn if "ignored" in str(w.message)]


def test_sharded_safetensors(tmp_path):
    from safetensors.numpy import save_file

    state = load_file(os.path.join(MODEL_DIR, "model.safetensors"))
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    for name, ks in halves.items():
        save_file({k: state[k] for k in ks}, str(tmp_path / name))
    index = {"metadata": {}, "weight_map": {k: name for name, ks in halves.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(open(os.path.join(MODEL_DIR, "config.json")).read())
    _, params = lora_jax.load_pretrained(str(tmp_path))
    _, ref_params = lora_jax.load_pretrained(MODEL_DIR, weights="model.safetensors")
    chex.assert_trees_all_equal(params, ref_params)


def test_wrong_shapes_name_the_parameter_and_both_shapes(tmp_path):
    config = json.load(open(os.path.join(MODEL_DIR, "config.json")))
    config["encoder_ffn_dim"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    os.symlink(os.path.join(os.path.abspath(MODEL_DIR), "model.safetensors"), tmp_path / "model.safetensors")
    with pytest.raises(lora_jax.CheckpointMismatchError, match=r"model\.encoder\.layers\.0\.fc1\.weight.*\(32, 64\).*\(32, 48\)"):
        lora_jax.load_pretrained(str(tmp_path))


def test_missing_weight_is_named(tmp_path):
    from safetensors.numpy import save_file

    state = load_file(os.path.join(MODEL_DIR, "model.safetensors"))
    del state["model.decoder.layers.1.fc2.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(open(os.path.join(MODEL_DIR, "config.json")).read())
    with pytest.raises(lora_jax.CheckpointMismatchError, match=r"missing weight 'model\.decoder\.layers\.1\.fc2\.bias'"):
        lora_jax.load_pretrained(str(tmp_path))


def test_no_weights_and_offline_hub_errors(tmp_path):
    (tmp_path / "config.json").write_text(open(os.path.join(MODEL_DIR, "config.json")).read())
    with pytest.raises(FileNotFoundError, match="no weights"):
        lora_jax.load_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        lora_jax.load_pretrained(str(tmp_path / "nope"))


def test_bfloat16_loading(ref):
    model, params = lora_jax.load_pretrained(MODEL_DIR, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params))
    logits = _logits(model, params, ref, jit=True)
    assert logits.dtype == jnp.float32
    # bf16 keeps ~3 significant digits; the argmax of the tiny model's logits mostly survives it.
    agree = (np.argmax(logits, -1) == np.argmax(ref["torch_logits"], -1)).mean()
    assert agree > 0.9


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu", "silu", "tanh", "quick_gelu"])
def test_activation_functions_build_and_run(act):
    config = lora_jax.BartConfig.from_pretrained(MODEL_DIR)
    import dataclasses

    model = BartForConditionalGeneration(dataclasses.replace(config, activation_function=act, scale_embedding=True))
    params = init_params(model, jax.random.PRNGKey(0))
    ids = jnp.ones((2, 6), jnp.int32)
    assert np.isfinite(model.apply({"params": params}, ids, ids, ids)).all()


def test_dropout_only_when_not_deterministic(loaded, ref):
    model, params = loaded
    args = (ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"])
    a = model.apply({"params": params}, *args)
    b = model.apply({"params": params}, *args, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    chex.assert_trees_all_close(a, ref["torch_logits"], atol=1e-4, rtol=0)
    assert np.abs(a - b).max() > 1e-3


def test_bart_base_config_builds_and_runs_forward():
    config = lora_jax.bart_base_config()
    model = BartForConditionalGeneration(config)
    params = init_params(model, jax.random.PRNGKey(0))
    flat = traverse_util.flatten_dict(params)
    assert sum(x.size for x in flat.values()) == 139_420_416 + 50_265  # transformers' num_parameters() + final_logits_bias (a buffer there)
    ids = jnp.full((1, 16), 5, jnp.int32)
    logits = jax.jit(model.apply)({"params": params}, ids, jnp.ones_like(ids), ids[:, :8])
    assert logits.shape == (1, 8, 50265) and np.isfinite(logits).all()


def test_beams_share_one_row_of_cross_attention_keys(tiny, ref):
    """init_cache(..., num_beams=G) keeps one cross-attention row per input; decoding G hypotheses per input against
    it gives what decoding against G copies of the encoder output gives."""
    model, params = tiny
    v, beams = {"params": params}, 3
    mask = ref["attention_mask"]
    enc = model.apply(v, ref["input_ids"], mask, method="encode")
    shared = model.apply(v, enc, 8, beams, method="init_cache")
    copied = model.apply(v, jnp.repeat(enc, beams, axis=0), 8, method="init_cache")
    assert shared[0]["cross"][0].shape[0] == enc.shape[0]
    assert shared[0]["self"]["k"].shape == copied[0]["self"]["k"].shape
    tokens = jnp.repeat(ref["decoder_input_ids"][:, :2], beams, axis=0)
    tokens = tokens.at[:, 1].set((tokens[:, 1] + jnp.arange(len(tokens))) % model.config.vocab_size)  # differ per beam
    for jit in (False, True):
        decode = lambda tok, c, m: model.apply(v, tok, None, m, cache=c, method="decode")
        decode = jax.jit(decode) if jit else decode
        a, b = (shared, mask), (copied, jnp.repeat(mask, beams, axis=0))
        for t in range(2):
            la, ca = decode(tokens[:, t : t + 1], *a)
            lb, cb = decode(tokens[:, t : t + 1], *b)
            chex.assert_trees_all_close(la, lb, atol=1e-5, rtol=0)
            a, b = (ca, a[1]), (cb, b[1])


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_keeps_params_loss_and_gradients(tiny, ref, policy):
    """Rematerialised layers compute the same loss and gradients (dropout masks included) under the same names."""
    model, params = tiny
    remat = model.clone(remat=policy)

    def loss(m, p):
        logits = m.apply({"params": p}, ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"],
                         deterministic=False, rngs={"dropout": jax.random.key(3)})
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    assert jax.tree_util.tree_structure(init_params(remat, jax.random.key(0))) == jax.tree_util.tree_structure(params)
    expected = jax.value_and_grad(loss, argnums=1)(model, params)
    got = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)(remat, params)
    chex.assert_trees_all_close(got, expected, atol=1e-5, rtol=1e-5)


def test_unknown_remat_policy_names_the_choices(tiny, ref):
    model, params = tiny
    with pytest.raises(ValueError, match="remat='dot' is not a policy.*'dots'"):
        model.clone(remat="dot").apply({"params": params}, ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"])
