"""Mixed precision by trainability: a bfloat16 (or quantised) frozen base with float32 adapters, float32 optimizer
state, a float32 side branch, float32 merging, and adapter files in the adapter's own dtype; the run config keys."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from lora_jax.checkpoints.safetensors_io import load_tensors
from lora_jax.tree import flatten_tree
from tests.conftest import MODEL_DIR
from train.config import ConfigError, load_config

LORA = lora_jax.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"), dropout=0.1)


@pytest.fixture(scope="module")
def bf16_base():
    """The fixture loaded with bfloat16 weights computing in float32."""
    return lora_jax.load_pretrained(MODEL_DIR, dtype=jnp.float32, param_dtype=jnp.bfloat16)


def _dtypes(tree) -> set:
    return {jnp.dtype(x.dtype) for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def test_bf16_storage_float32_compute_is_close_to_float32(tiny, bf16_base, batch):
    """Weights rounded to bfloat16 (8 bits of mantissa), arithmetic in float32: logits within 0.3 of float32's
    (logits span about +-20), jitted and not."""
    model32, params32 = tiny
    model, params = bf16_base
    assert model.dtype == jnp.float32 and model.param_dtype == jnp.bfloat16 and _dtypes(params) == {jnp.dtype(jnp.bfloat16)}
    args = (batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
    reference = model32.apply({"params": params32}, *args)
    for apply in (model.apply, jax.jit(model.apply)):
        logits = apply({"params": params}, *args)
        assert logits.dtype == jnp.float32
        assert 0 < float(jnp.max(jnp.abs(logits - reference))) <= 0.3


@pytest.mark.parametrize("jit", [True, False])
def test_adapters_and_optimizer_state_stay_float32_on_a_bf16_base(bf16_base, batch, jit):
    model, base = bf16_base
    params = lora_jax.init_lora(base, LORA, jax.random.PRNGKey(0))
    tx = lora_jax.lora_optimizer(optax.adamw(1e-2), LORA)
    state = lora_jax.create_train_state(params, LORA, tx)
    step = lora_jax.make_train_step(model, LORA, jit=jit, max_grad_norm=1.0)
    losses = []
    for i in range(3):
        state, metrics = step(state, batch, jax.random.PRNGKey(i))
        losses.append(float(metrics["loss"]))
    assert _dtypes(state.trainable) == {jnp.dtype(jnp.float32)}
    assert _dtypes(state.opt_state) == {jnp.dtype(jnp.float32)}
    assert _dtypes(state.frozen) == {jnp.dtype(jnp.bfloat16)}
    assert np.all(np.isfinite(losses)) and float(jnp.abs(state.trainable["model"]["encoder"]["layers"]["0"]["self_attn"]["q_proj"]["lora_b"]).max()) > 0


def test_side_branch_runs_in_float32_and_is_added_in_the_compute_dtype(tiny, batch):
    """A bfloat16-computing model with bfloat16 adapters, read from the traced program: the branch's matmuls take
    float32 operands, the model's own matmuls bfloat16 ones."""
    model32, params = tiny
    model = model32.clone(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    lora = lora_jax.LoraConfig(rank=3, alpha=6, targets=("q_proj", "v_proj"))  # no other axis of the model is 3 long
    adapted = lora_jax.init_lora(params, lora, jax.random.PRNGKey(0), adapter_dtype=jnp.bfloat16)
    args = (batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
    jaxpr = jax.make_jaxpr(lambda p: lora_jax.LoraModel(model, lora).apply({"params": p}, *args))(adapted)
    rank_dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"
                 and lora.rank in (e.invars[0].aval.shape[-1:] + e.invars[1].aval.shape[:1] + e.invars[1].aval.shape[-1:])]
    assert rank_dots and all(v.aval.dtype == jnp.float32 for e in rank_dots for v in e.invars)
    assert all(v.aval.dtype == jnp.bfloat16 for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"
               and e not in rank_dots for v in e.invars[:1])


def test_merge_in_float32_cast_once(bf16_base):
    _, base = bf16_base
    adapted = lora_jax.init_lora(base, LORA, jax.random.PRNGKey(0))
    path = ("model", "decoder", "layers", "1", "encoder_attn", "v_proj")
    flat = flatten_tree(adapted)
    flat[path + ("lora_b",)] = 0.05 * jax.random.normal(jax.random.PRNGKey(3), flat[path + ("lora_b",)].shape)
    merged = flatten_tree(lora_jax.merge_lora(lora_jax.tree.unflatten_tree(flat), LORA))
    kernel = merged[path + ("kernel",)]
    assert kernel.dtype == jnp.bfloat16
    expected = (flat[path + ("kernel",)].astype(np.float32) + LORA.scale_for("/".join(path))
                * (np.asarray(flat[path + ("lora_a",)], np.float64) @ np.asarray(flat[path + ("lora_b",)], np.float64)))
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(jnp.asarray(expected, jnp.float32).astype(jnp.bfloat16)))


def test_adapter_checkpoint_and_peft_export_hold_the_adapters_dtype(bf16_base, tmp_path):
    _, base = bf16_base
    adapted = lora_jax.init_lora(base, LORA, jax.random.PRNGKey(0))
    lora_jax.save_adapter(str(tmp_path / "adapter"), adapted, LORA, base_model=MODEL_DIR)
    meta = json.loads((tmp_path / "adapter" / "adapter_meta.json").read_text())
    assert {leaf["dtype"] for leaf in meta["leaves"].values()} == {"float32"}
    adapter, _, _ = lora_jax.load_adapter(str(tmp_path / "adapter"), base_params=base)
    assert _dtypes(adapter) == {np.dtype(np.float32)}
    lora_jax.export_peft(str(tmp_path / "peft"), adapted, LORA, MODEL_DIR)
    assert {v.dtype for v in load_tensors(str(tmp_path / "peft" / "adapter_model.safetensors")).values()} == {np.dtype(np.float32)}
    # bfloat16 adapters (lora.dtype: bfloat16) are written as bfloat16 and read back
    bf16 = lora_jax.init_lora(base, LORA, jax.random.PRNGKey(0), adapter_dtype=jnp.bfloat16)
    lora_jax.export_peft(str(tmp_path / "peft16"), bf16, LORA, MODEL_DIR)
    tensors = load_tensors(str(tmp_path / "peft16" / "adapter_model.safetensors"))
    assert {str(v.dtype) for v in tensors.values()} == {"bfloat16"}
    imported, _ = lora_jax.import_peft(str(tmp_path / "peft16"))
    chex.assert_trees_all_close(imported, jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), lora_jax.adapter_params(bf16)))


def test_loading_into_bf16_converts_leaf_by_leaf():
    """load_pretrained with a bfloat16 param_dtype casts each tensor as it is read (the float32 model never whole)."""
    from lora_jax.checkpoints.hf import leaf_converter, params_from_torch_state_dict
    from tests.test_quantization import _CountingState

    state = _CountingState(MODEL_DIR)
    params = params_from_torch_state_dict(state, lora_jax.BartConfig.from_pretrained(MODEL_DIR),
                                          leaf_converter(jnp.bfloat16, None, on_device=True))
    assert state.most_alive <= 2 and _dtypes(params) == {jnp.dtype(jnp.bfloat16)}


def _run_config(tmp_path, **model):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": {"checkpoint": MODEL_DIR, **model}, "data": {"train_files": __file__}}))
    return str(path)


def test_config_keys(tmp_path):
    cfg = load_config(_run_config(tmp_path, param_dtype="bfloat16", quantize="nf4"), ["lora.dtype=float32"])
    assert (cfg.model.dtype, cfg.model.param_dtype, cfg.model.quantize, cfg.lora.dtype) == ("float32", "bfloat16", "nf4", "float32")
    assert load_config(_run_config(tmp_path)).model.param_dtype is None  # null: the compute dtype
    with pytest.raises(ConfigError, match="'model.quantize' must be one of 'int8', 'nf4' or null"):
        load_config(_run_config(tmp_path, quantize="int4"))
    with pytest.raises(ConfigError, match="'model.param_dtype' must be"):
        load_config(_run_config(tmp_path, param_dtype="float16"))
    with pytest.raises(ConfigError, match="'lora.dtype' must be"):
        load_config(_run_config(tmp_path), ["lora.dtype=int8"])
    with pytest.raises(ConfigError, match="model.quantize='int8' needs lora.mode 'lora'"):
        load_config(_run_config(tmp_path, quantize="int8"), ["lora.mode=full"])


def test_converted_matmul_gradients_equal_autodiff_of_the_cast():
    """A bfloat16 kernel in a float32 layer (full fine-tuning of a bfloat16 model): the custom backward pass gives
    the gradients plain autodiff of `x @ kernel.astype(float32)` gives, for the inputs and the kernel, jitted or not."""
    from lora_jax.quantization import converted_matmul

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (16, 8)).astype(jnp.bfloat16)
    g = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 8))
    ours = lambda x, k: jnp.sum(converted_matmul(x, k, jnp.float32) * g)
    plain = lambda x, k: jnp.sum((x @ k.astype(jnp.float32)) * g)
    expected = jax.grad(plain, argnums=(0, 1))(x, kernel)
    for grad in (jax.grad(ours, argnums=(0, 1)), jax.jit(jax.grad(ours, argnums=(0, 1)))):
        dx, dk = grad(x, kernel)
        assert dk.dtype == jnp.bfloat16
        chex.assert_trees_all_close((dx, dk.astype(jnp.float32)), (expected[0], expected[1].astype(jnp.float32)),
                                    atol=2e-2, rtol=1e-2)
