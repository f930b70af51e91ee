"""Makes tests/fixtures/generation/group_beam.json: transformers' group (diverse) beam search outputs
(`num_beam_groups`, `diversity_penalty`) on the tiny-bart fixture model, for the inputs of cases.json.

transformers 5.x moved group beam search out of its core (to a hub `custom_generate` repository); 4.55.4 is the last
release with it in core (`_group_beam_search`, `HammingDiversityLogitsProcessor`, `BeamSearchScorer`), so the
fixtures are made with 4.55.4 and say so. Needs torch (tests do not):

    PYTHONPATH=<transformers 4.55.4>:. /work/torchvenv/bin/python -m scripts.make_group_beam_fixtures

Each case: {"name", "settings", "baseline", "ids"} as in cases.json. The baseline of a case is the same settings with
a negligible diversity penalty (1e-9: far below one float32 ulp of a log-probability, so every group runs the same
beam search); the script checks the real penalty changes the output, so the tests compare something it decides.
"""

from __future__ import annotations

import json
import os

import numpy as np


def _transformers_455():
    # transformers 4.55 imports the `kernels` package when it is installed; a newer one breaks its import, and
    # kernels never change generate's output on CPU.
    import transformers.utils.import_utils as import_utils

    import_utils._kernels_available = False
    import transformers

    if transformers.__version__ != "4.55.4":
        raise SystemExit(f"needs transformers 4.55.4 (group beam search in core), found {transformers.__version__}")
    return transformers


OFF = 1e-9  # a diversity penalty too small to change any float32 score: the groups search identically


def group_cases(common: list[int]) -> list[tuple[str, dict]]:
    """(name, settings): 4 beams in 2 groups, 6 in 3, 6 in 2, 4 in 4; penalties 0.5 / 1.0 / 2.0; with no-repeat n-grams,
    num_return_sequences, length penalty and early stopping variants, and two eos tokens."""
    g42, g63, g44 = ({"num_beams": b, "num_beam_groups": g} for b, g in ((4, 2), (6, 3), (4, 4)))
    return [
        ("group4x2_penalty0.5_return2", {**g42, "diversity_penalty": 0.5, "num_return_sequences": 2}),
        ("group4x2_penalty2_return4", {**g42, "diversity_penalty": 2.0, "num_return_sequences": 4}),
        ("group4x2_penalty1_no_repeat_return2", {**g42, "diversity_penalty": 1.0, "no_repeat_ngram_size": 2,
                                                 "num_return_sequences": 2}),
        ("group6x3_penalty0.5_return3", {**g63, "diversity_penalty": 0.5, "num_return_sequences": 3}),
        ("group6x3_penalty2_no_repeat_return6", {**g63, "diversity_penalty": 2.0, "no_repeat_ngram_size": 2,
                                                 "num_return_sequences": 6}),
        ("group6x3_penalty1_early_length_penalty", {**g63, "diversity_penalty": 1.0, "early_stopping": True,
                                                    "length_penalty": 2.0, "num_return_sequences": 2}),
        ("group4x2_penalty0.5_never_short", {**g42, "diversity_penalty": 0.5, "early_stopping": "never",
                                             "length_penalty": -0.5, "num_return_sequences": 3}),
        # the penalty acts before the repetition penalty (whose rule depends on the sign of the score)
        ("group6x3_penalty1_repetition_return6", {**g63, "diversity_penalty": 1.0, "repetition_penalty": 0.5,
                                                  "num_return_sequences": 6}),
        ("group4x4_penalty2_return4", {**g44, "diversity_penalty": 2.0, "num_return_sequences": 4}),
        ("group4x2_penalty1_two_eos_return3", {**g42, "diversity_penalty": 1.0, "eos_token_id": [2, common[0]],
                                               "num_return_sequences": 3}),
        ("group4x2_penalty1_long", {**g42, "diversity_penalty": 1.0, "max_new_tokens": 30,
                                    "forced_eos_token_id": None, "num_return_sequences": 4}),
        # outputs that end before max_new_tokens, all beams returned: early_stopping=False stops a group once its
        # best candidate (an eos one included), length-normalised, cannot beat its worst hypothesis
        ("group6x2_penalty2_long_return6", {"num_beams": 6, "num_beam_groups": 2, "diversity_penalty": 2.0,
                                            "max_new_tokens": 24, "forced_eos_token_id": None,
                                            "num_return_sequences": 6}),
        ("group4x2_penalty0.5_long_length_penalty2_return4", {**g42, "diversity_penalty": 0.5, "max_new_tokens": 24,
                                                              "forced_eos_token_id": None, "length_penalty": 2.0,
                                                              "num_return_sequences": 4}),
    ]


def main() -> None:
    transformers = _transformers_455()
    import torch

    from scripts.make_generation_fixtures import FIXTURE, NEW, OUT, _common_tokens, _run, inputs

    ref = np.load(os.path.join(FIXTURE, "reference.npz"))
    model = transformers.BartForConditionalGeneration.from_pretrained(os.path.join(FIXTURE, "model")).eval()
    input_ids, attention_mask = inputs(ref)
    batch = {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(attention_mask)}
    common = _common_tokens(_run(model, batch, {"max_new_tokens": NEW}))
    cases, unchanged = [], []
    for name, settings in group_cases(common):
        settings = {"max_new_tokens": NEW, **settings}
        baseline = {**settings, "diversity_penalty": OFF}
        off = {"name": f"{name}_off", "settings": baseline, "baseline": None, "ids": _run(model, batch, baseline)}
        ids = _run(model, batch, settings)
        if ids == off["ids"]:
            unchanged.append(f"case {name}: the diversity penalty does not change the output")
        cases += [off, {"name": name, "settings": settings, "baseline": off["name"], "ids": ids}]
    if unchanged:
        raise SystemExit("pick other settings:\n" + "\n".join(unchanged))
    meta = {"transformers": transformers.__version__, "torch": torch.__version__,
            "note": "transformers 4.55.4: the last release with group beam search in core",
            "input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist()}
    json.dump({**meta, "cases": cases}, open(os.path.join(OUT, "group_beam.json"), "w"), indent=None)
    print(json.dumps({"cases": len(cases), "out": OUT}))


if __name__ == "__main__":
    main()
