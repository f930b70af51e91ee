"""int8 token embeddings and the tied LM head (issue 25): `Int8Embedding` (one absmax scale per row), the blockwise
`int8_attend` against the dequantised table, the fixture model on an int8 base with int8 embeddings against the
same model on the dequantised tree, training, generation, merge, and XLA's buffer plan (no float32 table)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from lora_jax.quantization import (
    Int8Embedding, Int8Kernel, QuantSpec, dequantize_tree, int8_attend, quantize_base, quantize_int8_rows, storage_bytes,
)
from lora_jax.quantization import embed as embed_module
from lora_jax.tree import flatten_tree

LORA = lora_jax.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))
INT8_EMB = QuantSpec("int8", embeddings=True)
# float32, same products summed in another blocking: a few ulps of logits of size ~1
ATTEND_ATOL = 1e-5


@pytest.fixture(scope="module")
def table():
    return np.random.default_rng(0).standard_normal((1000, 48)).astype(np.float32) * 0.05


def test_row_quantisation_error_bound_and_layout(table):
    q = quantize_int8_rows(table)
    assert q.codes.dtype == jnp.int8 and q.codes.shape == (1000, 48) and q.scale.shape == (1000,)
    assert q.shape == (1000, 48) and q.nbytes == 1000 * 48 + 4 * 1000
    error = np.abs(np.asarray(q.dequantize()) - table)
    assert np.all(error <= np.abs(table).max(axis=1, keepdims=True) / 254 + 1e-8)  # half a step of each row's scale
    ids = jnp.asarray([[0, 999, 5], [5, 5, 1]])
    np.testing.assert_array_equal(np.asarray(q.lookup(ids)), np.asarray(q.dequantize())[np.asarray(ids)])


@pytest.mark.parametrize("block_rows", [4096, 128, 333])  # one block; blocks that divide 1000 unevenly
@pytest.mark.parametrize("jit", [True, False])
def test_blockwise_head_equals_dequantised_matmul(table, block_rows, jit):
    q = quantize_int8_rows(table)
    query = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 48)).astype(np.float32))
    dense = q.dequantize()
    attend = lambda x: int8_attend(x, q, jnp.float32, block_rows)
    maybe_jit = jax.jit if jit else (lambda f: f)
    chex.assert_trees_all_close(maybe_jit(attend)(query), query @ dense.T, atol=ATTEND_ATOL, rtol=0)
    # the gradient reaching the decoder: through a non-linear loss, so every logit's cotangent differs
    grad = maybe_jit(jax.grad(lambda x: jnp.sum(jnp.tanh(attend(x)))))(query)
    reference = jax.grad(lambda x: jnp.sum(jnp.tanh(x @ dense.T)))(query)
    chex.assert_trees_all_close(grad, reference, atol=ATTEND_ATOL, rtol=0)


def test_quantize_base_with_embeddings(tiny):
    _, params = tiny
    q = quantize_base(params, INT8_EMB)
    flat = flatten_tree(q)
    assert isinstance(flat[("model", "shared", "embedding")], Int8Embedding)
    assert not isinstance(flat[("model", "encoder", "embed_positions", "embedding")], Int8Embedding)  # positions stay
    assert all(isinstance(v, Int8Kernel) for p, v in flat.items() if p[-1] == "kernel")
    assert storage_bytes(q) < storage_bytes(quantize_base(params, "int8"))
    # without the flag embeddings stay float, as before
    assert not isinstance(flatten_tree(quantize_base(params, "int8"))[("model", "shared", "embedding")], Int8Embedding)


@pytest.mark.parametrize("jit", [True, False])
def test_forward_equals_forward_of_dequantised_base(tiny, batch, jit):
    model, params = tiny
    q = lora_jax.init_lora(quantize_base(params, INT8_EMB), LORA, jax.random.PRNGKey(0))
    args = (batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
    run = lambda p: lora_jax.LoraModel(model, LORA).apply({"params": p}, *args)
    run = jax.jit(run) if jit else run
    plain = lora_jax.combine(dequantize_tree(q), lora_jax.adapter_params(q))
    chex.assert_trees_all_close(run(q), run(plain), atol=1e-4, rtol=1e-5)


def test_training_with_int8_embeddings_lowers_the_loss(tiny_no_dropout, batch):
    model, params = tiny_no_dropout
    params = lora_jax.init_lora(quantize_base(params, INT8_EMB), LORA, jax.random.PRNGKey(0))
    state = lora_jax.create_train_state(params, LORA, lora_jax.lora_optimizer(optax.adam(1e-2), LORA))
    step = lora_jax.make_train_step(model, LORA)
    losses = []
    for _ in range(15):
        state, metrics = step(state, batch, jax.random.PRNGKey(1))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.8 * losses[0], losses
    assert isinstance(flatten_tree(state.frozen)[("model", "shared", "embedding")], Int8Embedding)


def test_generation_and_merge_equal_the_dequantised_base(tiny, batch):
    model, params = tiny
    q = quantize_base(params, INT8_EMB)
    run = lambda p: np.asarray(lora_jax.generate(model, p, batch["input_ids"], batch["attention_mask"], num_beams=2,
                                                 max_new_tokens=8))
    np.testing.assert_array_equal(run(q), run(dequantize_tree(q)))
    merged = lora_jax.merge_lora(lora_jax.init_lora(q, LORA, jax.random.PRNGKey(0)), LORA)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)  # a plain tree again
    chex.assert_trees_all_close(merged["model"]["shared"]["embedding"], q["model"]["shared"]["embedding"].dequantize(), atol=0)


def test_train_step_never_holds_a_float32_copy_of_the_table(monkeypatch):
    """XLA's buffer plan of a LoRA train step whose tied table dominates (vocab 32768, d 64: 8 MiB in float32, blocks
    of 4096 rows = 1 MiB): the temporaries (logits and their gradient, 1 MiB each, one block) stay below half the
    table's float32 bytes; with one block of the whole vocabulary (a float32 copy of the table) they exceed it."""
    config = lora_jax.BartConfig(vocab_size=32768, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                 decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                 max_position_embeddings=64, dropout=0.0)
    model = lora_jax.BartForConditionalGeneration(config)
    params = lora_jax.init_params(model, jax.random.PRNGKey(0))
    table_bytes = params["model"]["shared"]["embedding"].nbytes
    ids = jnp.ones((1, 8), jnp.int32)
    batch = dict(input_ids=ids, attention_mask=ids, decoder_input_ids=ids, labels=ids)
    p = lora_jax.init_lora(quantize_base(params, INT8_EMB), LORA, jax.random.PRNGKey(1))
    state = lora_jax.create_train_state(p, LORA, lora_jax.lora_optimizer(optax.adam(1e-3), LORA))

    def temp_bytes():  # a new step each time: HEAD_BLOCK_ROWS is read when the step is traced
        step = jax.jit(lora_jax.make_train_step(model, LORA, jit=False))
        return step.lower(state, batch, jax.random.PRNGKey(0)).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes() < table_bytes / 2
    monkeypatch.setattr(embed_module, "HEAD_BLOCK_ROWS", 32768)
    assert temp_bytes() > table_bytes
