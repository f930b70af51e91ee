"""Many adapters in one batch: stacking, the per-example forward (gathered and grouped), mixed-adapter generate.

The reference for every mixed batch is each row run alone with its own adapter through `LoraModel` (and the plain
base for slot 0)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax.training import compile_events
from lora_jax.generation import num_compilations
from lora_jax.lora.multi import MultiLoraModel, gathered_delta, grouped_delta
from lora_jax.lora.stack import stack_adapters, unstack
from tests.multi_helpers import adapters_for

# Logits of magnitude up to ~12 in float32: the two computations differ only in summation order (measured up to
# 1.2e-5). That is the noise floor: one adapter's LoraModel jitted vs un-jitted already differs by up to 1.05e-5.
ATOL, RTOL = 2e-5, 0.0


@pytest.fixture(scope="module")
def stack(tiny):
    _, base = tiny
    adapters, configs = adapters_for(base)
    stacked, info = stack_adapters(adapters, configs)
    return adapters, configs, stacked, info


def _single(model, base, adapters, configs, name):
    """(model, params) running adapter `name` alone, or the base for None."""
    if name is None:
        return model, base
    return lora_jax.LoraModel(model, configs[name]), lora_jax.combine(base, adapters[name])


def test_stack_layout_and_unstack_round_trip(stack):
    adapters, configs, stacked, info = stack
    assert info.names == ("", "qv4", "all2", "fc8") and info.rank == 8
    leaves = stacked["model"]["decoder"]["layers"]["1"]["fc2"]
    assert leaves["lora_a"].shape == (4, 64, 8) and leaves["lora_b"].shape == (4, 8, 32)
    # fc2 of the decoder has rank 3 in "fc8" (rank_pattern) and rsLoRA scale 4 / sqrt(3); "qv4" does not adapt it.
    np.testing.assert_allclose(leaves["lora_scale"], [0.0, 0.0, 5.0 / 2, 4.0 / np.sqrt(3)], rtol=1e-6)
    assert not np.any(leaves["lora_a"][1]) and not np.any(leaves["lora_a"][3, :, 3:])
    assert not np.any(leaves["lora_b"][0])
    back = unstack(stacked, info)
    assert set(back) == set(adapters)
    for name in adapters:
        chex.assert_trees_all_equal(back[name], jax.tree_util.tree_map(jnp.asarray, adapters[name]))
    assert list(info.ids(["fc8", None, "qv4"])) == [3, 0, 1]


def test_stack_refuses_bad_input(tiny, stack):
    adapters, configs, _, _ = stack
    with pytest.raises(ValueError, match="same adapters"):
        stack_adapters(adapters, {"qv4": configs["qv4"]})
    saved = {**adapters["qv4"], "final_logits_bias": np.zeros((1, 1000), np.float32)}
    with pytest.raises(ValueError, match="modules_to_save"):
        stack_adapters({"x": saved}, {"x": configs["qv4"]})
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        stack[3].ids(["nope"])


@pytest.mark.parametrize("method", ["gather", "grouped"])
@pytest.mark.parametrize("jit", [False, True])
def test_mixed_batch_equals_each_row_alone(tiny, batch, stack, method, jit):
    model, base = tiny
    adapters, configs, stacked, info = stack
    multi = MultiLoraModel(model, info, method)
    args = (batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
    ids = jnp.array([2, 0, 3, 1])
    fn = lambda p, i: multi.apply({"params": p}, *args, adapter_ids=i)
    logits = (jax.jit(fn) if jit else fn)(lora_jax.combine(base, stacked), ids)
    for row, slot in enumerate(ids.tolist()):
        one, params = _single(model, base, adapters, configs, info.names[slot] or None)
        expected = one.apply({"params": params}, *args)
        chex.assert_trees_all_close(logits[row], expected[row], atol=ATOL, rtol=RTOL)
    if not jit:  # same ops as the plain model, plus exact zeros from slot 0
        plain = model.apply({"params": base}, *args)
        assert np.array_equal(np.asarray(logits[1]), np.asarray(plain[1]))


def test_grouped_and_gathered_deltas_agree_and_match_a_loop():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5, 7)).astype(np.float32)
    a = rng.standard_normal((4, 7, 3)).astype(np.float32)
    b = rng.standard_normal((4, 3, 2)).astype(np.float32)
    scale = np.array([0.0, 1.5, -2.0, 0.25], np.float32)
    ids = np.array([3, 1, 1, 0, 3, 2])
    loop = np.stack([scale[k] * (x[n] @ a[k]) @ b[k] for n, k in enumerate(ids)])
    chex.assert_trees_all_close(gathered_delta(x, a, b, scale, ids), loop, atol=1e-5)
    chex.assert_trees_all_close(jax.jit(grouped_delta)(x, a, b, scale, ids), loop, atol=1e-5)


def test_one_compilation_whatever_the_mix(tiny, batch, stack):
    model, base = tiny
    _, _, stacked, info = stack
    multi = MultiLoraModel(model, info)
    args = (batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])

    def forward(params, ids):
        return multi.apply({"params": params}, *args, adapter_ids=ids)

    forward.__name__ = name = compile_events.unique_name("test_multi_forward")
    fn = jax.jit(forward)
    params = lora_jax.combine(base, stacked)
    for ids in ([0, 0, 0, 0], [1, 2, 3, 0], [3, 3, 1, 1]):
        fn(params, jnp.array(ids, jnp.int32)).block_until_ready()
    assert compile_events.compilations(name) == 1


def test_bad_adapter_ids_are_refused(tiny, batch, stack):
    model, base = tiny
    _, _, stacked, info = stack
    multi = MultiLoraModel(model, info)
    args = (batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
    with pytest.raises(ValueError, match=r"adapter_ids \[7\] are not slots"):
        multi.apply({"params": lora_jax.combine(base, stacked)}, *args, adapter_ids=np.array([0, 1, 7, 2]))
    with pytest.raises(ValueError, match="needs adapter_ids"):
        multi.apply({"params": lora_jax.combine(base, stacked)}, *args)
    with pytest.raises(ValueError, match=r"adapter_ids \[4\] are not slots"):
        lora_jax.generate(multi, lora_jax.combine(base, stacked), batch["input_ids"], batch["attention_mask"],
                          adapter_ids=np.array([0, 1, 4, 2]), max_new_tokens=4)
    with pytest.raises(ValueError, match=r"one per input row"):
        lora_jax.generate(multi, lora_jax.combine(base, stacked), batch["input_ids"], batch["attention_mask"],
                          adapter_ids=np.array([0, 1]), max_new_tokens=4)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_mixed_generate_equals_per_adapter_generate(tiny, batch, stack, num_beams):
    model, base = tiny
    adapters, configs, stacked, info = stack
    settings = dict(num_beams=num_beams, max_new_tokens=12, no_repeat_ngram_size=0, forced_bos_token_id=None,
                    forced_eos_token_id=None)
    params = lora_jax.combine(base, stacked)
    multi = MultiLoraModel(model, info)
    before = num_compilations()
    mixes = ([3, 1, 0, 2], [1, 1, 2, 2])
    outputs = [lora_jax.generate(multi, params, batch["input_ids"], batch["attention_mask"],
                                 adapter_ids=np.array(m), **settings) for m in mixes]
    assert num_compilations() - before == 1  # one program for both mixes
    for mix, ids in zip(mixes, outputs):
        for row, slot in enumerate(mix):
            one, one_params = _single(model, base, adapters, configs, info.names[slot] or None)
            alone = lora_jax.generate(one, one_params, batch["input_ids"][row:row + 1],
                                      batch["attention_mask"][row:row + 1], **settings)
            width = alone.shape[1]
            assert np.array_equal(ids[row, :width], alone[0]), (mix, row)
            assert np.all(ids[row, width:] == 1)  # the rest is padding
