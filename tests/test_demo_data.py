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


@pytest.mark.parametrize("path", ["data/demo", "data/pretrain", "data/demo_tokenizer", "data/demo_base"])
def test_artefact_exists_and_is_under_20_mb(path):
    assert 0 < _size(path) < LIMIT


def _rows(split):
    return [json.loads(line) for line in open(os.path.join(ROOT, "data/demo", f"{split}.jsonl"))]


def test_demo_splits_have_source_and_target_and_do_not_share_modules():
    splits = {s: _rows(s) for s in ("train", "validation", "test")}
    assert len(splits["train"]) >= 1000 and len(splits["validation"]) >= 200 and len(splits["test"]) >= 200
    for rows in splits.values():
        assert all(r["source"].strip() and r["target"].strip() and r["source"].startswith(r["target"]) for r in rows)
    modules = {s: {r["module"] for r in rows} for s, rows in splits.items()}
    assert not modules["train"] & modules["test"] and not modules["train"] & modules["validation"]


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
