"""The input pipeline: tokenization, bucketing, resume, evaluation batches, text infilling, ROUGE."""

import dataclasses
import json

import numpy as np
import pytest

import lora_jax
from lora_jax.data import TrainBatches, bucket_sizes, collate, eval_batches, load_splits, text_infilling, tokenize
from train.rouge import rouge
from tests.conftest import MODEL_DIR
from train.config import DataSection


@pytest.fixture(scope="module")
def tokenizer():
    return lora_jax.load_tokenizer(MODEL_DIR)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def data_cfg(tmp_path):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rng = np.random.default_rng(0)
    rows = [{"doc": " ".join(rng.choice(words, rng.integers(3, 60))), "summary": " ".join(rng.choice(words, rng.integers(1, 12)))}
            for _ in range(40)]
    rows += [{"doc": "   ", "summary": "empty source"}, {"doc": "empty target", "summary": ""}]
    return DataSection(train_files=_write(tmp_path / "train.jsonl", rows), eval_files=_write(tmp_path / "eval.jsonl", rows[:5]),
                       source_column="doc", target_column="summary", max_source_length=32, max_target_length=8)


def test_tokenize_drops_empty_rows_and_truncates(data_cfg, tokenizer):
    ds, dropped = tokenize(load_splits(data_cfg)["train"], tokenizer, data_cfg)
    assert dropped == 2 and len(ds) == 40
    assert max(len(r["input_ids"]) for r in ds) == 32 and max(len(r["labels"]) for r in ds) == 8
    assert all(r["input_ids"][0] == 0 and r["input_ids"][-1] == 2 for r in ds)


def test_missing_column_lists_the_columns(data_cfg, tokenizer):
    bad = dataclasses.replace(data_cfg, target_column="abstract")
    with pytest.raises(ValueError, match=r"data.target_column: the dataset has no column 'abstract'; its columns are \['doc', 'summary'\]"):
        tokenize(load_splits(data_cfg)["train"], tokenizer, bad)
    with pytest.raises(ValueError, match=r"data.target_column: data file \S+train.jsonl has no column 'abstract'; its columns"):
        load_splits(bad)


def test_collate_labels_and_shift():
    batch = collate([{"input_ids": [0, 7, 8, 2], "labels": [0, 9, 2]}], 6, 5, pad_id=1, decoder_start_id=2)
    np.testing.assert_array_equal(batch["input_ids"], [[0, 7, 8, 2, 1, 1]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(batch["labels"], [[0, 9, 2, -100, -100]])
    np.testing.assert_array_equal(batch["decoder_input_ids"], [[2, 0, 9, 2, 1]])
    np.testing.assert_array_equal(batch["decoder_attention_mask"], [[1, 1, 1, 0, 0]])
    assert all(v.dtype == np.int32 for v in batch.values())


def test_bucket_shapes_are_bounded(data_cfg, tokenizer):
    ds, _ = tokenize(load_splits(data_cfg)["train"], tokenizer, data_cfg)
    batches = TrainBatches(ds, 4, 32, 8, pad_id=1, decoder_start_id=2, seed=0)
    assert bucket_sizes(32) == [16, 32] and bucket_sizes(8) == [8]
    seen = set()
    stream = batches.batches()
    for _ in range(30):
        batch, _ = next(stream)
        seen.add((batch["input_ids"].shape[1], batch["labels"].shape[1]))
        assert batch["input_ids"].shape[0] == 4
    assert seen <= set(batches.shapes()) and len(batches.shapes()) == 2
    fixed = TrainBatches(ds, 4, 32, 8, pad_id=1, decoder_start_id=2, padding="fixed")
    assert fixed.shapes() == [(32, 8)]


def test_resume_position_gives_the_same_remaining_batches(data_cfg, tokenizer):
    ds, _ = tokenize(load_splits(data_cfg)["train"], tokenizer, data_cfg)
    batches = TrainBatches(ds, 4, 32, 8, pad_id=1, decoder_start_id=2, seed=3)
    stream = batches.batches()
    uninterrupted = [next(stream) for _ in range(25)]  # crosses epoch boundaries (about 10 batches per epoch)
    position = uninterrupted[12][1]
    resumed = batches.batches(position)
    for expected, _ in uninterrupted[13:]:
        got, _ = next(resumed)
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k])
    other_seed = TrainBatches(ds, 4, 32, 8, pad_id=1, decoder_start_id=2, seed=4).batches()
    assert not np.array_equal(next(other_seed)[0]["input_ids"], uninterrupted[0][0]["input_ids"])


def test_eval_batches_pad_and_mark_rows(data_cfg, tokenizer):
    ds, _ = tokenize(load_splits(data_cfg)["eval"], tokenizer, data_cfg)
    out = list(eval_batches(ds, 4, 32, 8, pad_id=1, decoder_start_id=2))
    assert [b["example_mask"].tolist() for b, _ in out] == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert len(out[1][1]) == 1 and all(b["input_ids"].shape == (4, 32) for b, _ in out)


def test_text_infilling():
    ids = [0] + list(range(10, 110)) + [2]
    noised = text_infilling(ids, mask_id=4, rng=np.random.default_rng(0))
    assert noised[0] == 0 and noised[-1] == 2
    kept = [t for t in noised[1:-1] if t != 4]
    assert 60 <= len(kept) <= 75  # ~30% of the 100 body tokens masked
    assert kept == sorted(kept)  # order kept, spans removed
    assert 4 in noised and len(noised) < len(ids)
    assert noised == text_infilling(ids, mask_id=4, rng=np.random.default_rng(0))


def test_denoising_objective_targets_the_original(data_cfg, tokenizer):
    cfg = dataclasses.replace(data_cfg, objective="denoising", max_target_length=32)
    ds, _ = tokenize(load_splits(cfg)["train"], tokenizer, cfg)
    long_rows = [r for r in ds if len(r["labels"]) > 20]
    assert long_rows and all(tokenizer.mask_token_id in r["input_ids"] for r in long_rows)
    assert all(tokenizer.mask_token_id not in r["labels"] for r in ds)


def test_denoising_options_copy_join_and_mask(data_cfg, tokenizer):
    base = dataclasses.replace(data_cfg, objective="denoising", max_source_length=256, max_target_length=256)
    train = load_splits(base)["train"]
    clean, _ = tokenize(train, tokenizer, dataclasses.replace(base, clean_fraction=1.0))
    assert all(r["input_ids"] == r["labels"] for r in clean)  # clean_fraction 1: every example is a plain copy
    half, _ = tokenize(train, tokenizer, dataclasses.replace(base, clean_fraction=0.5))
    copies = sum(r["input_ids"] == r["labels"] for r in half)
    assert 8 <= copies <= 32  # about half of the 40 rows (short rows can also come out un-noised)
    heavy, _ = tokenize(train, tokenizer, dataclasses.replace(base, mask_ratio=0.6))
    light, _ = tokenize(train, tokenizer, dataclasses.replace(base, mask_ratio=0.1))
    unmasked = lambda ds: sum(t != tokenizer.mask_token_id for r in ds for t in r["input_ids"])
    assert unmasked(heavy) < unmasked(light)
    joined, _ = tokenize(train, tokenizer, dataclasses.replace(base, join_rows=3, clean_fraction=1.0))
    texts = [r["target_text"] for r in joined]
    docs = [r["doc"] for r in train if r["doc"].strip()]  # denoising reads only the source column
    assert len(texts) == len(docs) and any("\n" in t for t in texts)
    assert all(t.split("\n")[0] == doc for t, doc in zip(texts, docs))  # row i starts its joined text
    again, _ = tokenize(train, tokenizer, dataclasses.replace(base, join_rows=3, clean_fraction=1.0))
    assert [r["target_text"] for r in again] == texts  # a function of (seed, index)


def test_rouge_against_hand_computed_values():
    # pred "the cat sat" vs ref "the cat sat down":
    #  R1: overlap 3, P = 3/3, R = 3/4 -> F = 2*1*0.75/1.75 = 0.857143
    #  R2: bigrams pred {the cat, cat sat}, ref {the cat, cat sat, sat down}: P = 1, R = 2/3 -> F = 0.8
    #  RL: LCS 3 -> same as R1
    # pred "a b" vs ref "c d": all 0. Means x 100:
    scores = rouge(["the cat sat", "a b"], ["the cat sat down", "c d"], use_stemmer=False)
    assert scores["rouge1"] == pytest.approx(100 * 0.857143 / 2, abs=1e-3)
    assert scores["rouge2"] == pytest.approx(100 * 0.8 / 2, abs=1e-3)
    assert scores["rougeL"] == pytest.approx(100 * 0.857143 / 2, abs=1e-3)
    # Stemming: "cats running" vs "cat runs": stems cat/run match both -> F = 1.
    assert rouge(["cats running"], ["cat runs"])["rouge1"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        rouge(["a", "b"], ["a"])
