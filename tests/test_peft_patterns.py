"""PEFT's rank_pattern / alpha_pattern resolve on import exactly as PEFT resolved them (first key in order that
matches the dotted module name as a whole or as a suffix at a '.' boundary), and the imported adapter runs the same
with scanned layers. The fixture (scripts/make_pattern_fixture.py) holds patterns a '.' -> '/' reading gets wrong."""

import json
import os

import chex
import jax
import pytest

import lora_jax
from lora_jax.checkpoints.peft import import_peft
from lora_jax.checkpoints.peft_patterns import peft_pattern_key
from lora_jax.tree import flatten_tree, path_str
from tests.conftest import FIXTURE

PATTERNS_DIR = os.path.join(FIXTURE, "peft_patterns")


def test_rank_and_scale_of_every_module_are_peft_s(tiny, ref):
    expected = json.load(open(os.path.join(PATTERNS_DIR, "expected.json")))
    adapter, config = import_peft(PATTERNS_DIR)
    ranks = {path_str(p[:-1]): v.shape[1] for p, v in flatten_tree(adapter).items() if p[-1] == "lora_a"}
    assert ranks == {name.replace(".", "/"): e["rank"] for name, e in expected.items()}
    for name, e in expected.items():
        path = name.replace(".", "/")
        assert config.rank_for(path) == e["rank"], name
        assert config.scale_for(path) == pytest.approx(e["scale"], rel=1e-6), name
    model, base = tiny
    params = lora_jax.combine(base, adapter)
    args = (ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"])
    unrolled = lora_jax.LoraModel(model, config).apply({"params": params}, *args)
    scanned = jax.jit(lambda p: lora_jax.LoraModel(model.clone(scan_layers=True), config).apply({"params": p}, *args))
    chex.assert_trees_all_close(scanned(params), unrolled, atol=2e-5, rtol=0)
    merged = lora_jax.merge_lora(params, config)
    chex.assert_trees_all_close(model.apply({"params": merged}, *args), unrolled, atol=1e-4, rtol=0)


@pytest.mark.parametrize("keys,name,want", [
    ((r"encoder\.[^.]+\.fc1",), "model.encoder.layers.0.fc1", None),  # [^.]+ cannot span a '.'
    (("fc1", "layers.0.fc1"), "model.encoder.layers.0.fc1", "fc1"),  # the first key wins, not the longest
    (("layers.0.fc1",), "model.encoder.layers.0.fc1", "layers.0.fc1"),
    (("c1",), "model.encoder.layers.0.fc1", None),  # a suffix only at a '.' boundary
    (("q_proj|fc1",), "model.decoder.layers.1.fc1", "q_proj|fc1"),
])
def test_pattern_key_is_peft_s_get_pattern_key(keys, name, want):
    assert peft_pattern_key(keys, name) == want
