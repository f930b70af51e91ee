"""Group (diverse) beam search (num_beam_groups, diversity_penalty) against transformers 4.55.4's `generate` (the
last release with it in core) on the tiny model, token for token. Fixtures: tests/fixtures/generation/group_beam.json
(scripts/make_group_beam_fixtures.py)."""

import json
import os

import numpy as np
import pytest

from lora_jax.generation import GenerationConfig, generate, num_compilations

FIXTURE = json.load(open(os.path.join(os.path.dirname(__file__), "fixtures", "generation", "group_beam.json")))
BY_NAME = {case["name"]: case for case in FIXTURE["cases"]}
IDS, MASK = np.asarray(FIXTURE["input_ids"], np.int32), np.asarray(FIXTURE["attention_mask"], np.int32)
# every case with a real penalty, and two baselines (a negligible penalty: every group runs the same beam search)
NAMES = [n for n in BY_NAME if not n.endswith("_off")] + ["group4x2_penalty2_return4_off", "group6x3_penalty0.5_return3_off"]


def test_fixture_is_from_transformers_with_group_beam_search():
    assert FIXTURE["transformers"] == "4.55.4"


@pytest.mark.parametrize("name", NAMES)
def test_group_beam_search_reproduces_transformers(tiny, name):
    """4 beams in 2 groups, 6 in 3, 6 in 2, 4 in 4; penalties 0.5-2; with no-repeat n-grams, a repetition penalty (the diversity penalty comes first), num_return_sequences (rows
    i*n .. i*n+n-1, best first across groups), early stopping True / "never", length penalties, two eos tokens and
    outputs that end before max_new_tokens."""
    case = BY_NAME[name]
    model, params = tiny
    if case["baseline"] is not None:  # the penalty decides the output: with a negligible one transformers differs
        assert case["ids"] != BY_NAME[case["baseline"]]["ids"]
    ids = generate(model, params, IDS, MASK, generation_config=case["settings"])
    assert ids.shape[0] == IDS.shape[0] * case["settings"].get("num_return_sequences", 1)
    np.testing.assert_array_equal(ids, np.asarray(case["ids"]))


def test_equal_settings_reuse_the_program_and_unjitted_agrees(tiny):
    model, params = tiny
    case = BY_NAME["group4x2_penalty0.5_return2"]
    generate(model, params, IDS, MASK, generation_config=case["settings"])
    before = num_compilations()
    ids = generate(model, params, IDS, MASK, generation_config=dict(case["settings"]))
    assert num_compilations() == before
    np.testing.assert_array_equal(ids, np.asarray(case["ids"]))
    unjitted = generate(model, params, IDS, MASK, generation_config=case["settings"], jit=False)
    np.testing.assert_array_equal(unjitted, np.asarray(case["ids"]))


@pytest.mark.parametrize("settings, message", [
    ({"num_beams": 4, "num_beam_groups": 3, "diversity_penalty": 1.0}, "num_beams=4 must be divisible by num_beam_groups=3"),
    ({"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 1.0, "do_sample": True}, "set do_sample=False"),
    ({"num_beams": 4, "num_beam_groups": 2}, "needs diversity_penalty > 0"),
    ({"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": -1.0}, "needs diversity_penalty > 0"),
    ({"num_beams": 4, "diversity_penalty": 1.0}, "needs num_beam_groups > 1"),
    ({"num_beams": 2, "num_beam_groups": 4, "diversity_penalty": 1.0}, "num_beam_groups <= num_beams"),
    ({"num_beams": 1, "num_beam_groups": 2, "diversity_penalty": 1.0}, "needs num_beams > 1"),
])
def test_refuses_what_transformers_refuses(settings, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**settings).validate()
