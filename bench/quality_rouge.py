"""ROUGE with 95% bootstrap intervals, and the synopsis task's baselines a reader can judge a model by.

Baselines (rows of data/synopsis, source = "<package>: <description>"):
- first N words of the description, N = the mean synopsis length of the train split (rounded);
- the first sentence of the description;
- the extractive oracle: the description's sentence with the best ROUGE-L against the reference (an upper bound for
  any system that copies one sentence);
- the base model before fine-tuning (beam search as the run config says), in `base_model_predictions`.

    python -m bench.quality_rouge [--config configs/synopsis.yaml] [--no-model]   # JSON of every baseline, both splits
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
from typing import Callable, Sequence

import numpy as np

ROUGE_COLUMNS = ("rouge1", "rouge2", "rougeL")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNOPSIS_CONFIG = os.path.join(REPO_ROOT, "configs", "synopsis.yaml")
_FScore = collections.namedtuple("_FScore", ["fmeasure"])  # the aggregator resamples any namedtuple of scores
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])|\n")


def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_COLUMNS), use_stemmer=True)


def per_example_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """{metric: [F-measure x 100 of each example]} for ROUGE-1/2/L (rounded to 0.01, to keep records small)."""
    scorer = _scorer()
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {k: [round(100.0 * s[k].fmeasure, 2) for s in scores] for k in ROUGE_COLUMNS}


def interval_of_mean(per_example: Sequence[dict[str, Sequence[float]]], *, seed: int = 0,
                     n_samples: int = 1000) -> dict[str, float]:
    """95% bootstrap interval (rouge-score's BootstrapAggregator) of the test mean of several runs of one row: each
    example's scores are first averaged over the runs (seeds), then the examples are resampled.
    per_example: one {metric: [score per example]} per run, same examples in the same order."""
    from rouge_score import scoring

    aggregator = scoring.BootstrapAggregator(confidence_interval=0.95, n_samples=n_samples)
    mean = {k: np.mean([run[k] for run in per_example], axis=0) for k in ROUGE_COLUMNS}
    for i in range(len(mean[ROUGE_COLUMNS[0]])):
        aggregator.add_scores({k: _FScore(float(mean[k][i])) for k in ROUGE_COLUMNS})
    result = _seeded(aggregator.aggregate, seed)
    out = {"examples": len(mean[ROUGE_COLUMNS[0]])}
    for k in ROUGE_COLUMNS:
        out[k], out[k + "_low"], out[k + "_high"] = (float(result[k].mid.fmeasure), float(result[k].low.fmeasure),
                                                       float(result[k].high.fmeasure))
    return out


def _seeded(fn, seed: int):
    """fn() with numpy's global generator seeded (the aggregator resamples with it), the caller's state restored."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return fn()
    finally:
        np.random.set_state(state)


def rouge_with_intervals(predictions: Sequence[str], references: Sequence[str], *, seed: int = 0,
                         n_samples: int = 1000) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure x 100 with the 95% bootstrap interval of rouge-score's BootstrapAggregator:
    {"rougeL": mid, "rougeL_low": ..., "rougeL_high": ..., ...}, "examples": n. The resampling draws from numpy's
    global generator, so it is seeded here and the caller's generator state is restored."""
    from rouge_score import scoring

    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references (need the same, > 0)")
    scorer, aggregator = _scorer(), scoring.BootstrapAggregator(confidence_interval=0.95, n_samples=n_samples)
    for pred, ref in zip(predictions, references):
        aggregator.add_scores(scorer.score(ref, pred))
    result = _seeded(aggregator.aggregate, seed)
    out = {"examples": len(predictions)}
    for k in ROUGE_COLUMNS:
        out[k] = float(100.0 * result[k].mid.fmeasure)
        out[k + "_low"], out[k + "_high"] = float(100.0 * result[k].low.fmeasure), float(100.0 * result[k].high.fmeasure)
    return out


def description(source: str) -> str:
    """The description part of a synopsis-task source "<package>: <description>"."""
    return source.split(": ", 1)[1] if ": " in source else source


def sentences(text: str) -> list[str]:
    """A description's sentences: split after . ! ? before a capital, digit or quote, and at paragraph breaks."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()] or [text.strip()]


def first_words(n: int) -> Callable[[str, str], str]:
    return lambda source, reference: " ".join(description(source).split()[:n])


def first_sentence(source: str, reference: str) -> str:
    return sentences(description(source))[0]


def oracle_sentence(source: str, reference: str) -> str:
    """The sentence with the best ROUGE-L F-measure against the reference (it sees the reference: an upper bound)."""
    scorer = _scorer()
    return max(sentences(description(source)), key=lambda s: scorer.score(reference, s)["rougeL"].fmeasure)


def rules(mean_target_words: float) -> dict[str, Callable[[str, str], str]]:
    n = max(1, round(mean_target_words))
    return {f"first {n} words": first_words(n), "first sentence": first_sentence, "oracle sentence": oracle_sentence}


def rule_scores(rows: Sequence[dict], mean_target_words: float) -> dict[str, dict[str, float]]:
    """{rule: rouge_with_intervals} of each rule on rows {"source", "target"}."""
    refs = [r["target"] for r in rows]
    return {name: rouge_with_intervals([rule(r["source"], r["target"]) for r in rows], refs)
            for name, rule in rules(mean_target_words).items()}


def base_model_predictions(config: str, split: str, overrides: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """(predictions, references) of the config's base model, not fine-tuned, on every row of split ("eval"/"test")."""
    from train.build import build
    from train.config import load_config
    from train.evaluate import summarize

    cfg = load_config(config, ["eval.max_examples=null", "data.max_eval_examples=null", *overrides])
    run = build(cfg, for_training=False)
    preds, refs, _ = summarize(run.apply_model, run.params, run.tokenizer, run.splits[split], run.cfg, run.gen,
                               run.pad_id, run.start_id)
    return preds, refs


def _jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def baseline_table(data_dir: str, *, config: str | None = SYNOPSIS_CONFIG, train_sample: int = 2000,
                   max_rows: int | None = None) -> dict:
    """{split: {baseline: rouge_with_intervals}} on validation and test (and the rules on a fixed sample of train,
    which shows how far the held-out descriptions, all unseen in pre-training, differ from the train ones).
    config None skips the base model (it generates for every row: minutes on a CPU)."""
    with open(os.path.join(data_dir, "info.json")) as f:
        mean_words = json.load(f)["mean_target_words"]["train"]
    out = {}
    for split, name in (("validation", "eval"), ("test", "test")):
        rows = _jsonl(os.path.join(data_dir, f"{split}.jsonl"))[:max_rows]
        out[split] = rule_scores(rows, mean_words)
        if config is not None:
            limit = [f"eval.max_examples={max_rows}"] if max_rows else []
            out[split]["base model (no fine-tuning)"] = rouge_with_intervals(*base_model_predictions(config, name, limit))
    import pyarrow.parquet as pq

    train = pq.read_table(os.path.join(data_dir, "train.parquet")).to_pylist()[:min(train_sample, max_rows or train_sample)]
    out["train sample"] = rule_scores(train, mean_words)
    if config is not None:
        out["train sample"]["base model (no fine-tuning)"] = rouge_with_intervals(*base_model_on_rows(config, train))
    return out


def base_model_on_rows(config: str, rows: Sequence[dict]) -> tuple[list[str], list[str]]:
    """base_model_predictions on any rows {"source", "target"} (written to a temporary file read as the test split)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps({"source": r["source"], "target": r["target"]}) + "\n" for r in rows)
        return base_model_predictions(config, "test", [f"data.test_files={path}"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.path.join(REPO_ROOT, "data", "synopsis"))
    ap.add_argument("--config", default=SYNOPSIS_CONFIG, help="run config whose base model is scored")
    ap.add_argument("--no-model", action="store_true", help="only the rules (seconds), not the base model (minutes)")
    args = ap.parse_args(argv)
    table = baseline_table(args.data, config=None if args.no_model else args.config)
    print(json.dumps({split: {k: {m: round(v, 2) for m, v in s.items()} for k, s in t.items()} for split, t in table.items()},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
