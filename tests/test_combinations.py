"""Every option with every other (issue 24): an all-pairs covering set of short library runs over the options that
can meet in a run (tests/combinations.py: layers, base precision / quantisation, DoRA / PiSSA / OLoRA, rsLoRA, rank and
alpha patterns, LoRA+, modules_to_save on lm_head / embeddings, LoRA on embeddings, tied / untied head, gradient
accumulation, remat, a mixed-adapter stack, a 2-device mesh), and every pair that cannot meet refused up front.

Tolerances: merged logits against unmerged within 2e-4 x max|logit| (float32 merge: only summation order differs;
int8 / NF4 bases merge into their dequantised float32 kernels) and 2e-2 x max|logit| on a bfloat16 base (the merged
kernel is rounded to bfloat16 once); the stack's logits against the row's own within 1e-4 x max|logit|.
"""

import functools
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax.checkpoints.peft import export_peft, import_peft
from lora_jax.tree import flatten_paths
from tests.combinations import (FACTORS, REFUSED, adapted_params, base_params, covering_rows, lora_config, row_id,
                                train)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = covering_rows()
LOCAL = [r for r in ROWS if r["mesh"] == 1]
MESH = [r for r in ROWS if r["mesh"] > 1]


def _batch(ref):
    keys = ("input_ids", "attention_mask", "decoder_input_ids", "labels")
    return {k: jnp.asarray(np.tile(ref[k], (2, 1)), jnp.int32) for k in keys}  # 4 rows: 2 micro-batches x 2 devices


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, input_ids, attention_mask, decoder_input_ids, kwargs):
    # One compiled function for every row: rows whose model (hashable, compared by value) and tree agree share it.
    return model.apply({"params": params}, input_ids, attention_mask, decoder_input_ids, **kwargs)


def _logits(model, params, ref, **kwargs):
    args = (ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"])
    return np.asarray(_forward(model, params, *args, kwargs), np.float32)


def _np(tree):
    return {k: np.asarray(v, np.float32) for k, v in flatten_paths(jax.device_get(tree)).items()}


def _assert_trees_equal(got, want, what):
    got, want = _np(got), _np(want)
    assert sorted(got) == sorted(want), what
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{what}: {k}")


def run_row(row, tiny, ref, tmp) -> dict:
    """One row of the matrix; asserts each check and returns the numbers it saw."""
    model, params = tiny
    model = lora_jax.BartForConditionalGeneration(model.config)  # a clean clone: the row sets scan and remat
    config = lora_config(row)
    base = base_params(row, params)
    adapted = adapted_params(row, base, config)
    state, losses, compilations = train(row, model, adapted, config, _batch(ref))
    assert np.all(np.isfinite(losses)) and compilations == 1, (losses, compilations)
    trained = jax.device_get(state.params)
    adapter = lora_jax.adapter_params(trained, config)
    directory = os.path.join(tmp, row_id(row))
    lora_jax.save_adapter(os.path.join(directory, "adapter"), adapter, config, base_model="tiny")
    loaded, loaded_config, _ = lora_jax.load_adapter(os.path.join(directory, "adapter"))
    _assert_trees_equal(loaded, adapter, "reloaded adapter")
    assert loaded_config == config
    run_model = model.clone(scan_layers=row["layers"] != "unrolled", remat=row["remat"])
    unmerged = _logits(lora_jax.LoraModel(run_model, config), trained, ref)
    merged = _logits(model, lora_jax.merge_lora(trained, config), ref)
    scale = float(np.abs(unmerged).max())
    tol = (2e-2 if row["base"] == "bf16" else 2e-4) * scale
    chex.assert_trees_all_close(merged, unmerged, atol=tol, rtol=0)
    export_peft(os.path.join(directory, "peft"), adapter, config, "tiny")
    imported, peft_config = import_peft(os.path.join(directory, "peft"))
    _assert_trees_equal(imported, adapter, "PEFT round trip")
    for module in {k.rsplit("/", 1)[0] for k in flatten_paths(adapter) if k.endswith("lora_a")}:
        assert peft_config.scale_for(module) == pytest.approx(config.scale_for(module)), module
    result = {"losses": losses, "compilations": compilations, "merge_diff": float(np.abs(merged - unmerged).max()),
              "scale": scale}
    if row["stack"]:
        other = jax.tree_util.tree_map(lambda x: 0.5 * np.asarray(x) + 0.01, adapter)
        stacked, info = lora_jax.stack_adapters({"row": adapter, "other": other}, {"row": config, "other": config})
        frozen = lora_jax.split_trainable(trained, config)[1]
        served = _logits(lora_jax.MultiLoraModel(run_model, info), lora_jax.combine(frozen, stacked), ref,
                         adapter_ids=info.ids(["row", "row"]))
        chex.assert_trees_all_close(served, unmerged, atol=1e-4 * scale, rtol=0)
        result["stack_diff"] = float(np.abs(served - unmerged).max())
    return result


def test_the_rows_cover_every_allowed_pair():
    import itertools

    names = list(FACTORS)
    for f, g in itertools.combinations(names, 2):
        for v in FACTORS[f]:
            for w in FACTORS[g]:
                refused = ((f, v), (g, w)) in REFUSED or ((g, w), (f, v)) in REFUSED
                covered = any(r[f] == v and r[g] == w for r in ROWS)
                assert covered != refused, (f, v, g, w)
    assert len(ROWS) <= 24


@pytest.mark.parametrize("row", LOCAL, ids=row_id)
def test_row(row, tiny, ref, tmp_path):
    run_row(row, tiny, ref, str(tmp_path))


@pytest.fixture(scope="module")
def mesh_results():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    indices = [str(ROWS.index(r)) for r in MESH]
    out = subprocess.run([sys.executable, "-m", "tests.combinations", *indices], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 2
    return result["results"]


@pytest.mark.parametrize("row", MESH, ids=row_id)
def test_row_on_a_two_device_mesh(row, mesh_results):
    assert np.all(np.isfinite(mesh_results[row_id(row)]["losses"]))


def _refusal(pair, tiny):
    """What a run with `pair` (other options at their first value) does up front: raises a ValueError."""
    row = {f: values[0] for f, values in FACTORS.items()}
    row.update(head="untied")  # so that LoRA on embeddings is refused only by its partner
    row.update(dict(pair))
    config = lora_config(row)  # a LoraConfig-level refusal raises here
    adapted = adapted_params(row, base_params(row, tiny[1]), config)
    if row["stack"]:
        adapter = lora_jax.adapter_params(adapted, config)
        lora_jax.stack_adapters({"a": adapter}, {"a": config})


REFUSAL_MESSAGES = {
    ("variant", "base"): "needs a plain kernel .* quantised: a residual init rewrites the base kernel",
    ("variant", "extra"): "adapts Dense kernels only, but target .*embed_tokens.* is an embedding",
    ("extra", "head"): "LoRA target 'embed_tokens' matches no module",
    ("stack", "variant"): "is a DoRA adapter .*: a stack serves plain low-rank branches only",
    ("stack", "extra"): "(holds leaves other than lora_a/lora_b|adapts the embedding)",
}


@pytest.mark.parametrize("pair", sorted(REFUSED, key=repr), ids=lambda p: f"{p[0][1]}+{p[1][1]}")
def test_refused_pairs(pair, tiny):
    with pytest.raises(ValueError, match=REFUSAL_MESSAGES[(pair[0][0], pair[1][0])]):
        _refusal(pair, tiny)


def test_dora_with_a_residual_init_is_refused():
    with pytest.raises(ValueError, match="use_dora with init='pissa' is not supported"):
        lora_jax.LoraConfig(use_dora=True, init="pissa")
