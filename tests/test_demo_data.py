"""The shipped offline demo artefacts: present, small, loadable."""

import json
import os

import pytest

import lora_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT = 20 * 2**20


def _size(path):
    path = os.path.join(ROOT, path)
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


@pytest.mark.parametrize("path", ["data/demo", "data/pretrain", "data/demo_tokenizer", "data/demo_base", "data/synopsis"])
def test_artefact_exists_and_is_under_20_mb(path):
    assert 0 < _size(path) < LIMIT


def _rows(split):
    return [json.loads(line) for line in open(os.path.join(ROOT, "data/demo", f"{split}.jsonl"))]


def test_demo_splits_have_source_and_target_and_do_not_share_modules():
    splits = {s: _rows(s) for s in ("train", "validation", "test")}
    assert len(splits["train"]) >= 1000 and len(splits["validation"]) >= 150 and len(splits["test"]) >= 150
    for rows in splits.values():
        for r in rows:
            lines = r["source"].split("\n")
            assert r["target"].strip() and lines[r["summary_line"]] == r["target"]
    modules = {s: {r["module"] for r in rows} for s, rows in splits.items()}
    assert not modules["train"] & modules["test"] and not modules["train"] & modules["validation"]


def test_no_position_rule_finds_the_summary_line():
    """The summary line sits anywhere: on the evaluation splits it is never always first, and every row has 4+ lines."""
    for split in ("validation", "test"):
        rows = _rows(split)
        assert all(len(r["source"].split("\n")) >= 4 for r in rows)
        positions = [r["summary_line"] for r in rows]
        assert max(positions.count(p) for p in set(positions)) < 0.35 * len(rows)
        last = sum(r["summary_line"] == len(r["source"].split("\n")) - 1 for r in rows)
        assert last < 0.35 * len(rows)


def test_baselines_by_hand():
    from scripts.make_demo_data import baseline_scores

    rows = [{"source": "a b\nthe summary here\nc", "target": "the summary here"}]
    exact = lambda prediction, reference: float(prediction == reference)
    scores = baseline_scores(rows, exact)
    assert scores == {"first line": 0.0, "last line": 0.0, "random line": 1 / 3, "longest line": 1.0, "shortest line": 0.0}


def test_tokenizer_round_trips_and_has_bart_specials():
    tok = lora_jax.load_tokenizer(os.path.join(ROOT, "data/demo_tokenizer"))
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id) == (0, 1, 2, 3, 4)
    text = "This package provides the command-line tools."
    ids = tok(text).input_ids
    assert ids[0] == 0 and ids[-1] == 2 and tok.decode(ids, skip_special_tokens=True) == text


def test_demo_base_loads_with_its_tokenizer():
    model, params = lora_jax.load_pretrained(os.path.join(ROOT, "data/demo_base"))
    tok = lora_jax.load_tokenizer(os.path.join(ROOT, "data/demo_base"))
    assert model.config.vocab_size == len(tok) == 4096
