"""DoRA, PiSSA and OLoRA: hand-computed single-layer references, PEFT fixtures (tests/fixtures/tiny-bart/variants,
made by scripts/make_variant_fixtures.py), and the conversion of residual-init adapters back to the original base."""

import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from lora_jax.checkpoints.peft import export_peft, import_peft
from lora_jax.lora import LoraConfig, LoraModel
from lora_jax.lora.residual_init import initial_adapter, original_base, plain_lora_on_original
from tests.conftest import FIXTURE, MODEL_DIR

VARIANTS = os.path.join(FIXTURE, "variants")
DORA_DIR = os.path.join(VARIANTS, "peft_dora")
Q0 = ("model", "encoder", "layers", "0", "self_attn", "q_proj")


@pytest.fixture(scope="module")
def variants():
    return dict(np.load(os.path.join(VARIANTS, "reference.npz")))


def _logits(model, params, ref, config):
    return LoraModel(model, config).apply({"params": params}, ref["input_ids"], ref["attention_mask"],
                                          ref["decoder_input_ids"])


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


# --- DoRA: one Dense layer by hand -------------------------------------------------------------------------------

def _dense_case():
    rng = np.random.default_rng(0)
    x, w, bias = rng.standard_normal((3, 5)), rng.standard_normal((5, 4)), rng.standard_normal(4)
    a, b, m = rng.standard_normal((5, 2)), rng.standard_normal((2, 4)), rng.uniform(0.5, 2.0, 4)
    g = rng.standard_normal((3, 4))  # the upstream gradient: loss = sum(g * y)
    return x, w, bias, a, b, m, g


def test_dora_forward_and_gradients_match_hand_computed_values():
    x, w, bias, a, b, m, g = _dense_case()
    s = 1.5
    v = w + s * a @ b
    n = np.linalg.norm(v, axis=0)
    y_ref = x @ v * (m / n) + bias
    grad_m = (g * (x @ v / n)).sum(0)  # n is a constant for differentiation
    gm = g * (m / n)
    grad_a, grad_b = s * x.T @ gm @ b.T, s * (x @ a).T @ gm
    config = LoraConfig(rank=2, alpha=3.0, targets=("dense",), use_dora=True)  # scale = 3 / 2 = 1.5
    model = LoraModel(nn.Dense(4, name="dense"), config)
    frozen = {"kernel": jnp.asarray(w, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}

    def loss(adapter):
        return (model.apply({"params": {**frozen, **adapter}}, jnp.asarray(x, jnp.float32)) * g).sum()

    adapter = {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32),
               "lora_magnitude": jnp.asarray(m, jnp.float32)}
    for fn in (jax.value_and_grad(loss), jax.jit(jax.value_and_grad(loss))):
        value, grads = fn(adapter)
        np.testing.assert_allclose(value, (y_ref * g).sum(), rtol=1e-5)
        np.testing.assert_allclose(grads["lora_magnitude"], grad_m, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(grads["lora_a"], grad_a, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(grads["lora_b"], grad_b, rtol=1e-4, atol=1e-5)
    y = model.apply({"params": {**frozen, **adapter}}, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    merged = lora_jax.merge_lora({"dense": {**frozen, **adapter}}, config)["dense"]
    np.testing.assert_allclose(merged["kernel"], v * (m / n), rtol=1e-5, atol=1e-6)


def test_dora_starts_at_the_base_and_cannot_be_unmerged(tiny, ref):
    model, params = tiny
    config = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"), use_dora=True)
    adapted = lora_jax.init_lora(params, config, jax.random.PRNGKey(0))
    np.testing.assert_allclose(_get(adapted, Q0)["lora_magnitude"], np.linalg.norm(_get(params, Q0)["kernel"], axis=0),
                               rtol=1e-6)
    chex.assert_trees_all_close(_logits(model, adapted, ref, config), _logits(model, params, ref, config), atol=1e-5)
    with pytest.raises(ValueError, match="DoRA merge cannot be undone"):
        lora_jax.unmerge_lora(lora_jax.merge_lora(adapted, config), lora_jax.adapter_params(adapted, config), config)


def test_peft_dora_adapter_reproduces_peft_logits_unmerged_and_merged(tiny, ref, variants):
    model, params = tiny
    adapter, config = import_peft(DORA_DIR)
    assert config.use_dora and "lora_magnitude" in _get(adapter, Q0)
    adapted = lora_jax.combine(params, adapter)
    for apply in (_logits, jax.jit(_logits, static_argnums=(0, 3))):
        chex.assert_trees_all_close(apply(model, adapted, ref, config), variants["dora_logits"], atol=1e-4)
    merged = lora_jax.merge_lora(adapted, config)
    chex.assert_trees_all_close(_logits(model, merged, ref, config), variants["dora_merged_logits"], atol=1e-4)


def test_dora_export_reimports_exactly_and_loads_in_peft(tmp_path, tiny, ref, variants):
    adapter, config = import_peft(DORA_DIR)
    export_peft(str(tmp_path), adapter, config, MODEL_DIR)
    again, config_again = import_peft(str(tmp_path))
    chex.assert_trees_all_equal(again, adapter)
    assert config_again == config
    torch = pytest.importorskip("torch", reason="optional: pip install 'lora_jax[torch]' to check against PEFT itself")
    peft = pytest.importorskip("peft")
    from transformers import BartForConditionalGeneration

    model = peft.PeftModel.from_pretrained(BartForConditionalGeneration.from_pretrained(MODEL_DIR), str(tmp_path)).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ref["input_ids"]), attention_mask=torch.tensor(ref["attention_mask"]),
                       decoder_input_ids=torch.tensor(ref["decoder_input_ids"])).logits.numpy()
    np.testing.assert_allclose(logits, variants["dora_logits"], atol=1e-4)


def test_dora_trains_its_magnitude_and_saves_it(tiny, batch, tmp_path):
    model, params = tiny
    config = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"), use_dora=True)
    adapted = lora_jax.init_lora(params, config, jax.random.PRNGKey(0))
    state = lora_jax.create_train_state(adapted, config, lora_jax.lora_optimizer(optax.adam(1e-2), config))
    step = lora_jax.make_train_step(model, config)
    losses = []
    for i in range(15):
        state, metrics = step(state, batch, jax.random.PRNGKey(i))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    before, after = _get(adapted, Q0)["lora_magnitude"], _get(state.trainable, Q0)["lora_magnitude"]
    assert not np.allclose(before, after)
    lora_jax.save_adapter(str(tmp_path / "dora"), state.params, config, base_params=params)
    loaded, config_back, _ = lora_jax.load_adapter(str(tmp_path / "dora"), base_params=params)
    assert config_back.use_dora
    np.testing.assert_array_equal(_get(loaded, Q0)["lora_magnitude"], np.asarray(after))


# --- PiSSA / OLoRA -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_4"])
def test_residual_init_starts_exactly_at_the_base(tiny, ref, init):
    model, params = tiny
    config = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"), init=init)
    adapted = lora_jax.init_lora(params, config, jax.random.PRNGKey(0))
    q = _get(adapted, Q0)
    np.testing.assert_allclose(q["kernel"] + 2.0 * q["lora_a"] @ q["lora_b"], _get(params, Q0)["kernel"], atol=1e-5)
    assert np.abs(q["lora_b"]).max() > 0.1  # a real principal part, not zeros
    chex.assert_trees_all_close(_logits(model, adapted, ref, config), ref["flax_logits"], atol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_init_matches_peft(tiny, variants, init):
    _, params = tiny
    config = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"), init=init)
    q = _get(lora_jax.init_lora(params, config, jax.random.PRNGKey(0)), Q0)
    a_peft, b_peft = variants[f"{init}_lora_A"].T, variants[f"{init}_lora_B"].T  # our (in, r), (r, out)
    signs = np.sign((np.asarray(q["lora_a"]) * a_peft).sum(0))  # singular vectors are unique up to sign
    np.testing.assert_allclose(np.asarray(q["lora_a"]) * signs, a_peft, atol=1e-5)
    np.testing.assert_allclose(np.asarray(q["lora_b"]) * signs[:, None], b_peft, atol=1e-5)
    np.testing.assert_allclose(q["kernel"], variants[f"{init}_residual"].T, atol=1e-5)


def test_pissa_niter_approximates_the_truncated_svd(tiny):
    _, params = tiny
    w = np.asarray(_get(params, Q0)["kernel"])
    u, s, vt = np.linalg.svd(w)
    best = (u[:, :4] * s[:4]) @ vt[:4]
    q = _get(lora_jax.init_lora(params, LoraConfig(rank=4, alpha=8, targets=("q_proj",), init="pissa_niter_8"),
                                jax.random.PRNGKey(0)), Q0)
    optimal = np.linalg.norm(w - best)  # Eckart-Young: no rank-4 matrix does better
    assert optimal <= np.linalg.norm(w - 2.0 * q["lora_a"] @ q["lora_b"]) < 1.05 * optimal


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_trained_residual_adapter_converts_to_plain_lora_on_the_original_base(tiny, batch, ref, init, tmp_path):
    model, params = tiny
    config = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"), init=init)
    adapted = lora_jax.init_lora(params, config, jax.random.PRNGKey(0))
    first = initial_adapter(adapted)
    state = lora_jax.create_train_state(adapted, config, lora_jax.lora_optimizer(optax.adam(1e-2), config))
    step = lora_jax.make_train_step(model, config)
    for i in range(10):
        state, _ = step(state, batch, jax.random.PRNGKey(i))
    trained = _logits(model, state.params, ref, config)
    adapter, plain = plain_lora_on_original(lora_jax.adapter_params(state.params, config), first, config)
    assert plain.rank == 8 and plain.alpha == 16.0 and plain.init == "gaussian"
    chex.assert_trees_all_close(original_base(state.frozen, first, config)["model"]["shared"], params["model"]["shared"])
    on_original = lora_jax.combine(params, adapter)
    chex.assert_trees_all_close(_logits(model, on_original, ref, plain), trained, atol=1e-4)
    export_peft(str(tmp_path), adapter, plain, MODEL_DIR)  # what PEFT would load on the untouched base
    again, plain_again = import_peft(str(tmp_path))
    chex.assert_trees_all_close(_logits(model, lora_jax.combine(params, again), ref, plain_again), trained, atol=1e-4)


def test_variant_settings_are_checked():
    with pytest.raises(ValueError, match="use_dora with init='pissa' is not supported"):
        LoraConfig(init="pissa", use_dora=True)
    with pytest.raises(ValueError, match="LoraConfig.init must be one of"):
        LoraConfig(init="pissa_niter_0")


def test_dora_on_a_quantised_base_and_residual_inits_refuse_one(tiny, ref):
    model, params = tiny
    quantised = lora_jax.quantize_base(params, "int8")
    config = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"), use_dora=True)
    adapted = lora_jax.init_lora(quantised, config, jax.random.PRNGKey(0))
    base_logits = model.apply({"params": quantised}, ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"])
    chex.assert_trees_all_close(_logits(model, adapted, ref, config), base_logits, atol=1e-4)  # starts at the base
    merged = lora_jax.merge_lora(adapted, config)  # a plain tree: dequantised, merged in float32
    assert isinstance(_get(merged, Q0)["kernel"], jax.Array)
    chex.assert_trees_all_close(_logits(model, merged, ref, config), base_logits, atol=1e-4)
    with pytest.raises(ValueError, match="quantised: a residual init rewrites the base kernel"):
        lora_jax.init_lora(quantised, LoraConfig(rank=4, targets=("q_proj",), init="pissa"), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="adapts Dense kernels only, but target 'model/shared' is an embedding"):
        lora_jax.init_lora(params, LoraConfig(rank=4, targets=("shared",), use_dora=True), jax.random.PRNGKey(0))
