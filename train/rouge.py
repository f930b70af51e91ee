"""ROUGE for summaries, with Google's `rouge-score` package (used by train.evaluate)."""

from __future__ import annotations

from typing import Sequence

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge(predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = True) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measures x 100. rougeLsum splits summaries into sentences at newlines."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {k: 0.0 for k in ROUGE_KEYS}
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=use_stemmer)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)
        for k in ROUGE_KEYS:
            totals[k] += scores[k].fmeasure
    return {k: 100.0 * v / len(predictions) for k, v in totals.items()}
