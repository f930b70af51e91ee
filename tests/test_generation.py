"""Greedy and beam search against transformers' PyTorch `generate` outputs for the fixture model."""

import json
import os

import jax
import numpy as np
import pytest

import lora_jax
from lora_jax.generation import GenerationConfig, generate, load_generation_config, num_compilations
from lora_jax.lora import LoraConfig, LoraModel
from tests.conftest import FIXTURE, MODEL_DIR

TEXTS = json.load(open(os.path.join(FIXTURE, "reference_texts.json")))
GREEDY = {k: v for k, v in TEXTS["generate_kwargs"].items() if k != "do_sample"}


@pytest.mark.parametrize(
    "settings,expected",
    [
        ({**GREEDY, "num_beams": 1}, "torch_greedy_ids"),
        ({**GREEDY, "num_beams": 4, "length_penalty": 1.0}, "torch_beam4_ids"),
        (TEXTS["generate_kwargs_beam4_cnn"], "torch_beam4_cnn_ids"),
    ],
)
def test_generate_reproduces_transformers(tiny, ref, settings, expected):
    model, params = tiny
    ids = generate(model, params, ref["input_ids"], ref["attention_mask"], generation_config=settings)
    np.testing.assert_array_equal(ids, ref[expected])


def test_greedy_without_jit_matches(tiny, ref):
    model, params = tiny
    with jax.disable_jit():
        ids = generate(model, params, ref["input_ids"][:2], ref["attention_mask"][:2], num_beams=1, max_new_tokens=6,
                       generation_config={**GREEDY})
    jitted = generate(model, params, ref["input_ids"][:2], ref["attention_mask"][:2], num_beams=1, max_new_tokens=6,
                      generation_config={**GREEDY})
    np.testing.assert_array_equal(ids, jitted)
    np.testing.assert_array_equal(ids, ref["torch_greedy_ids"][:2, : ids.shape[1]])


def test_same_shapes_compile_once(tiny, ref):
    model, params = tiny
    settings = {**GREEDY, "num_beams": 2, "max_new_tokens": 5}
    generate(model, params, ref["input_ids"], ref["attention_mask"], generation_config=settings)
    before = num_compilations()
    generate(model, params, ref["input_ids"][::-1], ref["attention_mask"][::-1], generation_config=settings)
    assert num_compilations() == before


def test_defaults_come_from_generation_config_json():
    cfg = load_generation_config(MODEL_DIR)
    assert cfg == GenerationConfig(forced_eos_token_id=2, decoder_start_token_id=2, eos_token_id=2, pad_token_id=1)


def test_explicit_none_switches_a_forced_token_off(tiny, ref):
    model, params = tiny
    settings = {**GREEDY, "max_new_tokens": 4, "forced_eos_token_id": None}
    ids = generate(model, params, ref["input_ids"][:1], ref["attention_mask"][:1], generation_config=settings)
    forced = generate(model, params, ref["input_ids"][:1], ref["attention_mask"][:1], generation_config={**settings, "forced_eos_token_id": 2})
    assert ids[0, -1] != 2 and forced[0, -1] == 2


def test_min_length_and_no_repeat_ngram(tiny, ref):
    model, params = tiny
    ids = generate(model, params, ref["input_ids"], ref["attention_mask"], num_beams=1, max_new_tokens=24,
                   min_length=10, no_repeat_ngram_size=2, generation_config=GREEDY)
    for row in ids:
        tokens = list(row)
        end = tokens.index(2, 1) if 2 in tokens[1:] else len(tokens)
        assert end >= 9  # </s> is not allowed before total length 10
        bigrams = list(zip(tokens[:end], tokens[1:end]))
        assert len(bigrams) == len(set(bigrams))


def test_lora_model_generates_like_its_merged_weights(tiny, ref):
    model, params = tiny
    config = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))
    from tests.conftest import peft_adapter_tree

    adapted = lora_jax.combine(params, peft_adapter_tree())
    settings = {**GREEDY, "num_beams": 4}
    unmerged = generate(LoraModel(model, config), adapted, ref["input_ids"], ref["attention_mask"], generation_config=settings)
    merged = generate(model, lora_jax.merge_lora(adapted, config), ref["input_ids"], ref["attention_mask"], generation_config=settings)
    np.testing.assert_array_equal(unmerged, merged)


def test_too_long_generation_is_refused(tiny, ref):
    model, params = tiny
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, params, ref["input_ids"], ref["attention_mask"], max_new_tokens=500)
