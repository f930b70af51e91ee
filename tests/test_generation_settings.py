"""Every generation setting against transformers (5.x) `generate` on the tiny model, the checkpoint's settings as the
default, and sampling. Fixtures: tests/fixtures/generation (scripts/make_generation_fixtures.py)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax.generation import GenerationConfig, generate, num_compilations, process_scores
from lora_jax.generation.serving import AdapterServer
from tests.conftest import MODEL_DIR
from tests.multi_helpers import adapters_for

GEN_FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "generation")
CASES = json.load(open(os.path.join(GEN_FIXTURE, "cases.json")))
CHECKPOINTS = json.load(open(os.path.join(GEN_FIXTURE, "checkpoints.json")))
BY_NAME = {case["name"]: case for case in CASES["cases"]}
IDS, MASK = np.asarray(CASES["input_ids"], np.int32), np.asarray(CASES["attention_mask"], np.int32)
GREEDY = {"max_new_tokens": 12}


@pytest.mark.parametrize("name", [n for n, case in BY_NAME.items() if not n.startswith("base_")])
def test_setting_reproduces_transformers(tiny, name):
    """Each processor alone (greedy and beam widths 2-4), combined, num_return_sequences, several eos tokens."""
    case = BY_NAME[name]
    model, params = tiny
    if case["baseline"] is not None:  # the setting decides the output: without it transformers gives other ids
        assert case["ids"] != BY_NAME[case["baseline"]]["ids"]
    # as a dict, so an explicit null (forced_eos_token_id) switches the checkpoint's setting off
    ids = generate(model, params, IDS, MASK, generation_config=case["settings"])
    rows = IDS.shape[0] * case["settings"].get("num_return_sequences", 1)
    assert ids.shape[0] == rows
    np.testing.assert_array_equal(ids, np.asarray(case["ids"]))


def _checkpoint(tmp_path, kind: str) -> str:
    """A copy of the tiny model shipping bart-large-cnn-like settings in generation_config.json or config.json."""
    directory = tmp_path / kind
    directory.mkdir()
    shutil.copy(os.path.join(MODEL_DIR, "model.safetensors"), directory)
    config = json.load(open(os.path.join(MODEL_DIR, "config.json")))
    settings = CHECKPOINTS["settings"]
    if kind == "generation_config":
        (directory / "config.json").write_text(json.dumps(config))
        tokens = {"decoder_start_token_id": 2, "eos_token_id": 2, "pad_token_id": 1, "bos_token_id": 0}
        (directory / "generation_config.json").write_text(json.dumps({**settings, **tokens}))
    else:
        (directory / "config.json").write_text(json.dumps({**config, **settings}))
    return str(directory)


@pytest.mark.parametrize("kind", ["generation_config", "legacy_config"])
def test_checkpoint_settings_are_the_default(tmp_path, kind):
    """generate(model, params, ids, mask) after load_pretrained = transformers' generate with the checkpoint's
    defaults (4 beams, no-repeat 3-grams, min/max length, forced BOS/EOS, length penalty); so does AdapterServer;
    saving the model writes them back."""
    model, params = lora_jax.load_pretrained(_checkpoint(tmp_path, kind))
    expected = np.asarray(CHECKPOINTS[kind]["ids"])
    assert model.generation_config.num_beams == 4
    np.testing.assert_array_equal(generate(model, params, IDS, MASK), expected)
    plain = np.asarray(CHECKPOINTS["plain_tiny_bart"]["ids"])  # transformers on the same weights without the settings
    assert plain.shape != expected.shape or not np.array_equal(plain, expected)
    if kind == "legacy_config":
        return
    server = AdapterServer(model, params, slots=1, targets=("q_proj",))
    np.testing.assert_array_equal(server.generate(IDS, MASK, [None] * 4), expected)
    lora_jax.save_pretrained(str(tmp_path / "saved"), params, model, flax=False)
    again, _ = lora_jax.load_pretrained(str(tmp_path / "saved"))
    assert again.generation_config == model.generation_config


def test_plain_checkpoint_default_is_transformers_default(tiny):
    """No max_length in generation_config.json: 20 new tokens (max_length 21), forced eos at the end, as transformers."""
    model, params = tiny
    np.testing.assert_array_equal(generate(model, params, IDS, MASK), np.asarray(CHECKPOINTS["plain_tiny_bart"]["ids"]))


@pytest.mark.parametrize("where", ["generation_config.json", "config.json"])
def test_unimplemented_setting_in_a_file_is_refused(tmp_path, where):
    directory = tmp_path / "ckpt"
    shutil.copytree(MODEL_DIR, directory)
    if where == "config.json":  # a legacy checkpoint: config.json is read only without generation_config.json
        (directory / "generation_config.json").unlink()
    target = directory / where
    target.write_text(json.dumps({**json.load(open(target)), "epsilon_cutoff": 3e-4}))
    with pytest.raises(ValueError, match=f"{where}: generation setting epsilon_cutoff=0.0003 is not implemented"):
        lora_jax.load_pretrained(str(directory))


# ----------------------------------------------------------------------------------------------------- sampling

SAMPLE = {**GREEDY, "do_sample": True}


@pytest.fixture(scope="module")
def greedy_ids(tiny):
    model, params = tiny
    return generate(model, params, IDS, MASK, **GREEDY)


@pytest.mark.parametrize("settings", [{"top_k": 1}, {"top_p": 1e-6, "top_k": 0}, {"min_p": 1.0, "top_k": 0}])
def test_sampling_that_keeps_one_token_is_greedy(tiny, greedy_ids, settings):
    model, params = tiny
    key = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(generate(model, params, IDS, MASK, prng_key=key, **SAMPLE, **settings), greedy_ids)


def test_same_key_same_output(tiny, greedy_ids):
    model, params = tiny
    settings = dict(SAMPLE, temperature=1.5, top_k=0, num_return_sequences=3)
    before = num_compilations()
    first = generate(model, params, IDS, MASK, prng_key=jax.random.PRNGKey(0), **settings)
    again = generate(model, params, IDS, MASK, prng_key=jax.random.PRNGKey(0), **settings)
    other = generate(model, params, IDS, MASK, prng_key=jax.random.PRNGKey(1), **settings)
    assert num_compilations() == before + 1  # the key is data: one program for every key
    np.testing.assert_array_equal(first, again)
    assert first.shape[0] == 3 * IDS.shape[0]
    assert not np.array_equal(first[: other.shape[0], : other.shape[1]], other[: first.shape[0], : first.shape[1]])
    assert len({tuple(r) for r in first[6:9]}) > 1  # an input's three draws differ (random tokens: unsure model)


@pytest.mark.parametrize("settings", [
    {"temperature": 1.5, "top_k": 0},
    {"top_k": 6},
    {"top_p": 0.9, "top_k": 0, "temperature": 1.5},
    {"top_k": 0, "repetition_penalty": 1.3, "encoder_repetition_penalty": 0.8},
    {"min_p": 0.05, "top_k": 0},
])
def test_token_frequencies_match_processed_softmax(tiny, settings):
    """4000 draws of the token after a forced BOS for one random-token input: each token's frequency is within 5
    standard errors (plus 1e-3) of softmax(processed logits) (a failure has probability < 1e-4 even before the
    fixed seed); tokens the warpers remove are never drawn."""
    model, params = tiny
    draws = 4000
    ids, mask = np.repeat(IDS[3:4, :16], draws, 0), np.repeat(MASK[3:4, :16], draws, 0)
    gen = {"max_new_tokens": 2, "forced_bos_token_id": 0, "forced_eos_token_id": None, "do_sample": True, **settings}
    out = generate(model, params, ids, mask, prng_key=jax.random.PRNGKey(7), generation_config=gen)
    cfg = lora_jax.generation.resolve_config(model, gen)
    variables = {"params": params}
    prefix = jnp.asarray([[2, 0]])
    logits = model.apply(variables, jnp.asarray(ids[:1]), jnp.asarray(mask[:1]), prefix)[:, -1].astype(jnp.float32)
    sequences = jnp.asarray([[2, 0, 1]])
    scores = process_scores(logits, sequences, jnp.asarray(2), cfg, jnp.asarray(ids[:1]))
    probs = np.asarray(jax.nn.softmax(scores, axis=-1))[0].astype(np.float64)
    freq = np.bincount(out[:, 2], minlength=probs.size) / draws
    bound = 5 * np.sqrt(probs * (1 - probs) / draws) + 1e-3
    assert np.all(np.abs(freq - probs) <= bound), np.max(np.abs(freq - probs) - bound)
    assert np.all(freq[probs == 0] == 0)
    assert (probs > 0.01).sum() >= 2  # a real distribution, not one token


@pytest.mark.parametrize("case", CHECKPOINTS["warpers"]["cases"], ids=lambda c: f"{c['setting']}-keep{c['keep']}")
def test_warper_equals_transformers(case):
    """Each sampling warper against transformers' on random scores (the same tokens removed, the rest unchanged)."""
    from lora_jax.generation import warpers

    scores = jnp.asarray(CHECKPOINTS["warpers"]["scores"], jnp.float32)
    fn = {"temperature": lambda s, v, k: s / v, "top_k": warpers.top_k, "top_p": warpers.top_p,
          "min_p": warpers.min_p, "typical_p": warpers.typical_p}[case["setting"]]
    expected = np.asarray([[-np.inf if x is None else x for x in row] for row in case["scores"]], np.float32)
    np.testing.assert_allclose(np.asarray(fn(scores, case["value"], case["keep"])), expected, rtol=1e-6)


def test_beam_sampling_is_reproducible_and_returns_n_beams(tiny):
    model, params = tiny
    settings = dict(SAMPLE, num_beams=3, num_return_sequences=2, top_k=20)
    first = generate(model, params, IDS, MASK, prng_key=jax.random.PRNGKey(5), **settings)
    np.testing.assert_array_equal(first, generate(model, params, IDS, MASK, prng_key=jax.random.PRNGKey(5), **settings))
    assert first.shape[0] == 2 * IDS.shape[0] and np.all(first[:, 0] == 2)


def test_mixed_adapter_sampling(tiny):
    """Sampling in a mixed-adapter batch (AdapterServer): top_k=1 draws what greedy picks, row by row."""
    model, base = tiny
    adapters, configs = adapters_for(base, ("qv4",))
    kw = dict(adapters=adapters, configs=configs, **GREEDY)
    names = ["qv4", None, "qv4", None]
    greedy = AdapterServer(model, base, **kw).generate(IDS, MASK, names)
    sampler = AdapterServer(model, base, do_sample=True, top_k=1, **kw)
    with pytest.raises(ValueError, match="prng_key"):
        sampler.generate(IDS, MASK, names)
    np.testing.assert_array_equal(sampler.generate(IDS, MASK, names, prng_key=jax.random.PRNGKey(0)), greedy)


# ----------------------------------------------------------------------------------------------------- float64

def test_float64_inference():
    """Under jax_enable_x64 a float64 model generates (greedy and beams) what transformers' float32 model does."""
    with jax.enable_x64(True):
        model, params = lora_jax.load_pretrained(MODEL_DIR, dtype=jnp.float64)
        assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.float64
        for name in ("base_beam1", "base_beam3"):
            ids = generate(model, params, IDS, MASK, generation_config=BY_NAME[name]["settings"])
            np.testing.assert_array_equal(ids, np.asarray(BY_NAME[name]["ids"]))


def test_config_round_trips_through_json(tmp_path):
    cfg = GenerationConfig.from_dict({"bad_words_ids": [[5], [6, 7]], "sequence_bias": [[[8], -1.0]],
                                      "eos_token_id": [2, 9], "suppress_tokens": [3], "num_beams": 3,
                                      "exponential_decay_length_penalty": [4, 1.1]})
    assert cfg.bad_words_ids == ((5,), (6, 7)) and cfg.eos_ids == (2, 9)
    again = GenerationConfig.from_dict(json.loads(json.dumps(cfg.to_json_dict())))
    assert again == cfg and hash(again) == hash(cfg)


def test_evaluation_inherits_the_checkpoint_settings(tiny):
    """The run's eval section left null keeps the checkpoint's settings (bart-large-cnn's beams, length penalty,
    no-repeat n-grams); a value set there wins."""
    from train.build import generation_settings
    from train.config import EvalSection, RunConfig

    model, _ = tiny
    cnn = model.clone(generation_config=GenerationConfig(num_beams=4, length_penalty=2.0, no_repeat_ngram_size=3))
    assert generation_settings(RunConfig(), cnn) == cnn.generation_config
    chosen = generation_settings(RunConfig(eval=EvalSection(num_beams=2)), cnn)
    assert (chosen.num_beams, chosen.length_penalty, chosen.no_repeat_ngram_size) == (2, 2.0, 3)
