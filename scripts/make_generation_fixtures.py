"""Makes tests/fixtures/generation/: transformers' (5.x, PyTorch) `generate` outputs on the tiny-bart fixture model
for every logits processor lora_jax implements, alone and with beam search, plus num_return_sequences, several eos
tokens and checkpoints that ship their own generation settings. Needs torch (tests do not).

    PYTHONPATH=. /work/torchvenv/bin/python -m scripts.make_generation_fixtures

Inputs (both files): `input_ids`, `attention_mask` (4, S), two reference texts and two random token rows.
Each case of cases.json: {"name", "settings" (keyword arguments of generate, JSON), "baseline" (the name of the
case without the setting under test, or null), "ids" (transformers' output)}. The script checks that each setting
changes the output against its baseline, so the tests compare something the setting decides. Token ids used by
bad_words / sequence_bias / suppress settings are picked from the baseline outputs, so they matter.
checkpoints.json: generation settings to ship with a copy of the tiny model (as generation_config.json or in a
legacy config.json), and transformers' output of `generate(input_ids, attention_mask)` with no settings at all.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import transformers

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "tiny-bart")
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "generation")
NEW = 12  # max_new_tokens of every case: short, so the tests stay cheap
CNN = {"num_beams": 4, "max_length": 24, "min_length": 5, "length_penalty": 2.0, "no_repeat_ngram_size": 3,
       "early_stopping": True, "forced_bos_token_id": 0, "forced_eos_token_id": 2}


def _run(model, batch, settings: dict) -> list:
    with torch.no_grad():
        out = model.generate(**batch, **settings)
    return out.tolist()


def _common_tokens(ids: list, skip=(0, 1, 2)) -> list[int]:
    """Generated tokens, most frequent first (special tokens left out)."""
    values, counts = np.unique([t for row in ids for t in row[1:] if t not in skip], return_counts=True)
    return [int(v) for v in values[np.argsort(-counts, kind="stable")]]


def processor_cases(base_greedy: list) -> list[tuple[str, dict]]:
    """(name, settings) per processor: greedy, and one or two beam widths among 2, 3, 4."""
    common = _common_tokens(base_greedy)
    first = sorted({row[1] for row in base_greedy})
    a, b, c = common[:3]
    pair = [base_greedy[0][1], base_greedy[0][2]]  # a 2-token sequence the greedy output starts with
    single = [
        ("repetition_penalty", {"repetition_penalty": 2.0}, (3,)),
        ("repetition_penalty_below_1", {"repetition_penalty": 0.5}, (2,)),
        ("encoder_repetition_penalty", {"encoder_repetition_penalty": 3.0}, (4,)),
        ("encoder_repetition_penalty_below_1", {"encoder_repetition_penalty": 0.5}, (2,)),
        ("encoder_no_repeat_ngram_size", {"encoder_no_repeat_ngram_size": 2}, (3,)),
        ("bad_words_ids", {"bad_words_ids": [[a], pair, [2]]}, (4,)),
        ("suppress_tokens", {"suppress_tokens": [a, b]}, (3,)),
        ("begin_suppress_tokens", {"begin_suppress_tokens": first}, (4,)),
        ("sequence_bias", {"sequence_bias": [[[a], -10.0], [pair, -10.0], [[c], 4.0]]}, (2,)),
        ("exponential_decay_length_penalty", {"exponential_decay_length_penalty": [3, 1.6]}, (3,)),
    ]
    cases = []
    for name, settings, widths in single:
        cases.append((f"greedy_{name}", {"num_beams": 1, **settings}))
        cases += [(f"beam{w}_{name}", {"num_beams": w, **settings}) for w in widths]
    return cases


def inputs(ref) -> tuple[np.ndarray, np.ndarray]:
    """Two of tiny-bart's reference inputs (texts the model summarises confidently) and two of random tokens (where
    it is unsure, so penalties change beam search too), the last one shorter: (4, S) ids and mask."""
    ids, mask = ref["input_ids"][:2].copy(), ref["attention_mask"][:2].copy()
    rng = np.random.default_rng(0)
    rand, rand_mask = np.ones_like(ids), np.zeros_like(mask)
    rand[:, :14], rand_mask[:, :14] = rng.integers(5, 1000, (2, 14)), 1
    rand[:, 0], rand[:, 13] = 0, 2
    rand[1, 9], rand[1, 10:], rand_mask[1, 10:] = 2, 1, 0
    return np.concatenate([ids, rand]), np.concatenate([mask, rand_mask])


WARPERS = {"temperature": 0.7, "top_k": 5, "top_p": 0.8, "min_p": 0.1, "typical_p": 0.6}


def warper_cases() -> dict:
    """transformers' sampling warpers, each alone, on seeded random scores (3, 50): the processed scores (-inf as
    null), for min_tokens_to_keep 1 and 3."""
    from transformers.generation import logits_process as lp

    scores = (np.random.default_rng(0).standard_normal((3, 50)) * 3).astype(np.float32)
    make = {"temperature": lambda v, k: lp.TemperatureLogitsWarper(v), "top_k": lambda v, k: lp.TopKLogitsWarper(v, min_tokens_to_keep=k),
            "top_p": lambda v, k: lp.TopPLogitsWarper(v, min_tokens_to_keep=k), "min_p": lambda v, k: lp.MinPLogitsWarper(v, min_tokens_to_keep=k),
            "typical_p": lambda v, k: lp.TypicalLogitsWarper(v, min_tokens_to_keep=k)}
    out = []
    for name, value in WARPERS.items():
        for keep in (1, 3):
            warped = make[name](value, keep)(None, torch.tensor(scores)).numpy()
            out.append({"setting": name, "value": value, "keep": keep,
                        "scores": [[None if np.isinf(x) else float(x) for x in row] for row in warped]})
    return {"scores": scores.tolist(), "cases": out}


def main() -> None:
    ref = np.load(os.path.join(FIXTURE, "reference.npz"))
    model = transformers.BartForConditionalGeneration.from_pretrained(os.path.join(FIXTURE, "model")).eval()
    input_ids, attention_mask = inputs(ref)
    batch = {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(attention_mask)}
    results: dict[str, dict] = {}
    unchanged = []

    def add(name: str, settings: dict, baseline: str | None):
        ids = _run(model, batch, {"max_new_tokens": NEW, **settings})
        if baseline is not None and ids == results[baseline]["ids"]:
            unchanged.append(f"case {name}: {settings} does not change the output of {baseline}")
        results[name] = {"name": name, "settings": {"max_new_tokens": NEW, **settings}, "baseline": baseline,
                         "ids": ids}

    for beams in (1, 2, 3, 4):
        add(f"base_beam{beams}", {"num_beams": beams}, None)
    for name, settings in processor_cases(results["base_beam1"]["ids"]):
        add(name, settings, f"base_beam{settings['num_beams']}")
    for beams in (1, 2):  # min_new_tokens needs outputs that end before max_new_tokens
        add(f"base_long_beam{beams}", {"num_beams": beams, "max_new_tokens": 40, "forced_eos_token_id": None}, None)
        add(f"beam{beams}_min_new_tokens", {"num_beams": beams, "max_new_tokens": 40, "forced_eos_token_id": None,
                                            "min_new_tokens": 30}, f"base_long_beam{beams}")
    common = _common_tokens(results["base_beam1"]["ids"])
    combined = {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "encoder_no_repeat_ngram_size": 3,
                "min_new_tokens": 4, "suppress_tokens": [common[1]], "sequence_bias": [[[common[0]], -1.5]],
                "exponential_decay_length_penalty": [5, 1.3]}
    add("beam4_combined", {"num_beams": 4, **combined}, "base_beam4")
    add("beam4_combined_renormalized", {"num_beams": 4, **combined, "renormalize_logits": True}, None)
    add("beam3_combined_length_penalty", {"num_beams": 3, **combined, "length_penalty": 0.5,
                                          "early_stopping": "never"}, "base_beam3")
    add("greedy_combined", {"num_beams": 1, **combined, "remove_invalid_values": True}, "base_beam1")
    # num_return_sequences: the n best finished beams of each input, best first
    add("beam4_return3", {"num_beams": 4, "num_return_sequences": 3}, None)
    add("beam3_return2_no_repeat", {"num_beams": 3, "num_return_sequences": 2, "no_repeat_ngram_size": 2}, None)
    # several end-of-sequence tokens: the most generated token also ends a sequence
    add("greedy_two_eos", {"num_beams": 1, "eos_token_id": [2, common[0]]}, "base_beam1")
    add("beam4_two_eos", {"num_beams": 4, "eos_token_id": [2, common[0]]}, "base_beam4")
    add("beam2_three_eos", {"num_beams": 2, "eos_token_id": [2, common[0], common[1]],
                            "forced_eos_token_id": [2, common[1]]}, "base_beam2")

    if unchanged:
        raise SystemExit("pick other values:\n" + "\n".join(unchanged))
    checkpoints = {}
    for kind in ("generation_config", "legacy_config"):
        directory = os.path.join("/tmp", f"lora_jax_generation_{kind}")
        os.makedirs(directory, exist_ok=True)
        config = json.load(open(os.path.join(FIXTURE, "model", "config.json")))
        for name in ("model.safetensors",):
            data = open(os.path.join(FIXTURE, "model", name), "rb").read()
            open(os.path.join(directory, name), "wb").write(data)
        gen_file = os.path.join(directory, "generation_config.json")
        if kind == "generation_config":
            json.dump(config, open(os.path.join(directory, "config.json"), "w"))
            json.dump({**CNN, "decoder_start_token_id": 2, "eos_token_id": 2, "pad_token_id": 1, "bos_token_id": 0},
                      open(gen_file, "w"))
        else:
            json.dump({**config, **CNN}, open(os.path.join(directory, "config.json"), "w"))
            if os.path.exists(gen_file):
                os.remove(gen_file)
        loaded = transformers.BartForConditionalGeneration.from_pretrained(directory).eval()
        assert loaded.generation_config.num_beams == CNN["num_beams"], kind
        checkpoints[kind] = {"ids": _run(loaded, batch, {})}
    checkpoints["settings"] = CNN
    checkpoints["plain_tiny_bart"] = {"ids": _run(model, batch, {})}  # generation_config.json of tiny-bart/model
    checkpoints["warpers"] = warper_cases()

    os.makedirs(OUT, exist_ok=True)
    meta = {"transformers": transformers.__version__, "torch": torch.__version__,
            "input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist()}
    json.dump({**meta, "cases": list(results.values())}, open(os.path.join(OUT, "cases.json"), "w"), indent=None)
    json.dump({**meta, **checkpoints}, open(os.path.join(OUT, "checkpoints.json"), "w"), indent=None)
    print(json.dumps({"cases": len(results), "out": OUT}))


if __name__ == "__main__":
    main()
