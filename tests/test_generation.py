"""Greedy and beam search against transformers' PyTorch `generate` outputs for the fixture model."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax.generation import (
    GenerationConfig,
    generate,
    generate_padded,
    load_generation_config,
    num_compilations,
    process_scores,
)
from lora_jax.lora import LoraConfig, LoraModel
from tests.conftest import FIXTURE, MODEL_DIR, peft_adapter_tree

TEXTS = json.load(open(os.path.join(FIXTURE, "reference_texts.json")))
GREEDY = TEXTS["generate_kwargs"]  # max_new_tokens 24, no forced tokens, early_stopping True (do_sample False)
CNN = TEXTS["generate_kwargs_beam4_cnn"]


@pytest.mark.parametrize(
    "settings,expected",
    [
        ({**GREEDY, "num_beams": 1}, "torch_greedy_ids"),
        ({**GREEDY, "num_beams": 4, "length_penalty": 1.0}, "torch_beam4_ids"),
        (CNN, "torch_beam4_cnn_ids"),
    ],
)
def test_generate_reproduces_transformers(tiny, ref, settings, expected):
    model, params = tiny
    ids = generate(model, params, ref["input_ids"], ref["attention_mask"], generation_config=settings)
    np.testing.assert_array_equal(ids, ref[expected])


def test_padded_buffer_is_the_trimmed_output_then_padding(tiny, ref):
    model, params = tiny
    padded = np.asarray(generate_padded(model, params, ref["input_ids"], ref["attention_mask"], generation_config=CNN))
    expected = ref["torch_beam4_cnn_ids"]
    assert padded.shape == (4, 1 + CNN["max_new_tokens"])
    np.testing.assert_array_equal(padded[:, : expected.shape[1]], expected)
    assert np.all(padded[:, expected.shape[1] :] == 1)


def test_cached_decoding_matches_full_decoding(tiny, ref):
    """Feeding the reference decoder inputs one token at a time through the cache gives the full-sequence logits."""
    model, params = tiny
    variables = {"params": params}
    mask, targets = ref["attention_mask"], ref["decoder_input_ids"]
    length = targets.shape[1]

    @jax.jit
    def both(input_ids):
        encoded = model.apply(variables, input_ids, mask, method="encode")
        full, _ = model.apply(variables, targets, encoded, mask, method="decode")
        cache = model.apply(variables, encoded, length, method="init_cache")

        def step(cache, token):
            logits, cache = model.apply(variables, token[:, None], None, mask, cache=cache, method="decode")
            return cache, logits[:, 0]

        _, stepped = jax.lax.scan(step, cache, targets.T)
        return full, jnp.swapaxes(stepped, 0, 1)

    full, stepped = both(ref["input_ids"])
    chex.assert_trees_all_close(stepped, full, atol=1e-5, rtol=1e-5)  # float32 reassociation on logits up to ~10


@pytest.mark.parametrize("num_beams", [1, 2])
def test_unjitted_generation_matches_jitted(tiny, ref, num_beams):
    model, params = tiny
    args = (model, params, ref["input_ids"][:1], ref["attention_mask"][:1])
    settings = dict(generation_config=GREEDY, num_beams=num_beams, max_new_tokens=6)
    with jax.disable_jit():
        eager = generate(*args, **settings)
    np.testing.assert_array_equal(eager, generate(*args, **settings))
    if num_beams == 1:
        np.testing.assert_array_equal(eager, ref["torch_greedy_ids"][:1, : eager.shape[1]])


def test_same_shapes_compile_once(tiny, ref):
    model, params = tiny
    settings = {**GREEDY, "num_beams": 2, "max_new_tokens": 5}
    before = num_compilations()
    generate(model, params, ref["input_ids"], ref["attention_mask"], generation_config=settings)
    assert num_compilations() == before + 1
    # Other inputs of the same shapes, a fresh but equal model object and an equal settings dict: no recompilation.
    same_model = lora_jax.BartForConditionalGeneration(model.config, generation_config=model.generation_config)
    generate(same_model, params, ref["input_ids"][::-1], ref["attention_mask"][::-1], generation_config=dict(settings))
    assert num_compilations() == before + 1


def test_defaults_come_from_generation_config_json():
    cfg = load_generation_config(MODEL_DIR)
    assert cfg == GenerationConfig(forced_eos_token_id=2, decoder_start_token_id=2, eos_token_id=2, pad_token_id=1)


def test_generation_config_json_replaces_config_json(tmp_path):
    """As transformers 5 reads a checkpoint: generation_config.json alone when present (config.json's generation
    keys are then not read), else config.json's generation keys; special tokens missing from the file from config.json."""
    (tmp_path / "config.json").write_text(json.dumps({"num_beams": 4, "min_length": 3, "forced_bos_token_id": 0,
                                                      "pad_token_id": 5, "d_model": 32}))
    cfg = load_generation_config(str(tmp_path))
    assert (cfg.num_beams, cfg.min_length, cfg.forced_bos_token_id, cfg.pad_token_id) == (4, 3, 0, 5)
    (tmp_path / "generation_config.json").write_text(json.dumps({"num_beams": 2, "forced_bos_token_id": None}))
    cfg = load_generation_config(str(tmp_path))
    assert (cfg.num_beams, cfg.min_length, cfg.forced_bos_token_id, cfg.length_penalty, cfg.pad_token_id) == (2, 0, None, 1.0, 5)


def test_model_config_forces_eos_at_max_length_unless_switched_off(tiny, ref):
    model, params = tiny
    args = (model, params, ref["input_ids"][:1], ref["attention_mask"][:1])
    forced = generate(*args, max_new_tokens=4)  # defaults from model.config: forced_eos_token_id=2
    free = generate(*args, generation_config={**GREEDY, "max_new_tokens": 4})  # forced_eos_token_id: None
    assert forced.shape == free.shape == (1, 5)
    assert forced[0, -1] == 2 and free[0, -1] != 2


def _banned_like_transformers(seq: list, n: int) -> set:
    """transformers' NoRepeatNGram rule, written out: tokens completing an n-gram already in `seq`."""
    if len(seq) + 1 < n:
        return set()
    prefix = tuple(seq[len(seq) - n + 1 :])
    return {seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == prefix}


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_bans_what_transformers_bans(n):
    rng = np.random.default_rng(n)
    sequences = rng.integers(0, 4, size=(16, 12)).astype(np.int32)  # small vocabulary: many repeats
    cfg = GenerationConfig(no_repeat_ngram_size=n, max_new_tokens=11)
    for cur_len in range(1, 12):
        scores = np.asarray(process_scores(jnp.zeros((16, 6)), jnp.asarray(sequences), jnp.asarray(cur_len), cfg))
        for row, seq in zip(scores, sequences):
            assert set(np.flatnonzero(np.isinf(row))) == _banned_like_transformers(list(seq[:cur_len]), n)


@pytest.mark.parametrize(
    "settings,cur_len,allowed",
    [
        (dict(min_length=5), 4, [0, 1, 3, 4, 5]),  # eos (2) banned while the total length is below 5
        (dict(min_length=5), 5, [0, 1, 2, 3, 4, 5]),
        (dict(forced_bos_token_id=0), 1, [0]),
        (dict(forced_bos_token_id=0), 2, [0, 1, 2, 3, 4, 5]),
        (dict(forced_eos_token_id=2), 7, [2]),  # max_length 8: the last step
        (dict(forced_eos_token_id=2), 6, [0, 1, 2, 3, 4, 5]),
    ],
)
def test_length_and_forced_token_processors(settings, cur_len, allowed):
    cfg = GenerationConfig(max_new_tokens=7, **settings)
    scores = process_scores(jnp.zeros((2, 6)), jnp.zeros((2, 8), jnp.int32), jnp.asarray(cur_len), cfg)
    np.testing.assert_array_equal(np.isfinite(np.asarray(scores)), np.isin(np.arange(6), allowed)[None].repeat(2, 0))


def test_lora_model_generates_like_its_merged_weights(tiny, ref):
    model, params = tiny
    config = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))
    adapted = lora_jax.combine(params, peft_adapter_tree())
    settings = {**GREEDY, "num_beams": 4}
    inputs = (ref["input_ids"], ref["attention_mask"])
    unmerged = generate(LoraModel(model, config), adapted, *inputs, generation_config=settings)
    merged = generate(model, lora_jax.merge_lora(adapted, config), *inputs, generation_config=settings)
    np.testing.assert_array_equal(unmerged, merged)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(max_new_tokens=500), ValueError, "max_position_embeddings"),
        (dict(early_stopping="sometimes"), ValueError, "early_stopping"),
        (dict(num_beams=0), ValueError, "num_beams"),
        (dict(generation_config={"do_sample": True}), ValueError, "prng_key"),
        (dict(num_beams=2, num_return_sequences=3), ValueError, "num_return_sequences"),
        (dict(num_return_sequences=2), ValueError, "num_return_sequences"),
        # group beam search: what transformers refuses too
        (dict(num_beams=4, num_beam_groups=3, diversity_penalty=0.5), ValueError, "divisible by num_beam_groups"),
        (dict(num_beams=4, num_beam_groups=2, diversity_penalty=0.5, do_sample=True), ValueError, "do_sample=False"),
        # a setting that would change the ids and is not implemented, however it arrives
        (dict(epsilon_cutoff=3e-4), ValueError, "epsilon_cutoff"),
        (dict(generation_config={"force_words_ids": [[5]]}), ValueError, "force_words_ids"),
        (dict(generation_config={"guidance_scale": 1.5}), ValueError, "guidance_scale"),
        # a name lora_jax does not know (a typo) is never dropped
        (dict(repetition_penality=1.2), ValueError, "repetition_penality"),
        (dict(generation_config={"topk": 5}), ValueError, "topk"),
        (dict(bad_words_ids=[]), ValueError, "bad_words_ids"),
        (dict(generation_config="beam4"), TypeError, "generation_config"),
    ],
)
def test_bad_settings_are_refused(tiny, ref, kwargs, error, match):
    model, params = tiny
    with pytest.raises(error, match=match):
        generate(model, params, ref["input_ids"], ref["attention_mask"], **kwargs)
