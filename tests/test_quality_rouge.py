"""bench.quality_rouge: bootstrap intervals around the mean, and the synopsis baselines' rules."""

import numpy as np
import pytest

from bench.quality_rouge import first_sentence, first_words, oracle_sentence, rouge_with_intervals, rule_scores, sentences
from train.rouge import rouge

ROWS = [{"source": "libfoo-dev: Foo is a library. It parses bar files quickly.\nThis package has the headers.",
         "target": "development files for foo"},
        {"source": "bartool: A tool to convert bar files. Written in C.", "target": "convert bar files"}]


def test_rules_read_the_description_not_the_package_name():
    source = ROWS[0]["source"]
    assert sentences("Foo is a library. It parses v2.0 files.\nHeaders.") == ["Foo is a library.", "It parses v2.0 files.", "Headers."]
    assert first_words(3)(source, "") == "Foo is a"
    assert first_sentence(source, "") == "Foo is a library."
    assert oracle_sentence(ROWS[1]["source"], ROWS[1]["target"]) == "A tool to convert bar files."


def test_interval_brackets_the_mean_and_is_reproducible():
    preds = [f"word{i % 5} common text" for i in range(40)]
    refs = [f"word{i % 3} common" for i in range(40)]
    state = np.random.get_state()
    a, b = rouge_with_intervals(preds, refs, n_samples=200), rouge_with_intervals(preds, refs, n_samples=200)
    assert a == b and a["examples"] == 40
    assert np.random.get_state()[1].tolist() == state[1].tolist()  # the caller's generator is left alone
    plain = rouge(preds, refs)
    for k in ("rouge1", "rouge2", "rougeL"):
        assert a[k + "_low"] <= a[k] <= a[k + "_high"] and a[k + "_low"] < a[k + "_high"]
        assert a[k] == pytest.approx(plain[k], abs=0.5)  # bootstrap median of the mean, close to the mean


def test_rule_scores_name_n_from_the_mean_synopsis_length():
    table = rule_scores(ROWS, mean_target_words=3.4)
    assert set(table) == {"first 3 words", "first sentence", "oracle sentence"}
    assert table["oracle sentence"]["rougeL"] >= table["first sentence"]["rougeL"]
    with pytest.raises(ValueError, match="predictions"):
        rouge_with_intervals([], [])
