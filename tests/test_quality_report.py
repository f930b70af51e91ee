"""bench.quality's report: rows from run records, the plain findings, and QUALITY.md with its plot."""

import os

import pytest

from bench.quality import systems
from bench.quality_report import findings, summarize, write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _record(system, lr, seed, rouge_l, chosen, trainable):
    scores = {"rouge1": rouge_l + 5, "rouge2": rouge_l - 10, "rougeL": rouge_l, "rougeLsum": rouge_l}
    return {"system": system, "learning_rate": lr, "seed": seed, "steps": 10, "eval_loss": 1.0, "validation": scores,
            "test": scores, "train_wall_s": 5.0, "trainable_params": trainable, "total_params": 1000,
            "train_compilations": 1, "chosen": chosen, "peak_rss_bytes": 2**30}


RECORDS = [
    _record("full", 1e-3, 0, 50.0, True, 1000), _record("full", 3e-3, 0, 40.0, False, 1000),
    _record("full", 1e-3, 1, 52.0, True, 1000), _record("full", 1e-3, 2, 54.0, True, 1000),
    _record("lora_r1_qv", 1e-2, 0, 45.0, True, 10), _record("lora_r1_qv", 1e-3, 0, 30.0, False, 10),
    _record("lora_r2_qv", 1e-2, 0, 51.0, True, 20),
    _record("lora_r16_attn", 1e-2, 0, 47.0, True, 40), _record("dora_r16_attn", 3e-3, 0, 48.5, True, 41),
]


def test_every_row_of_the_paper_table_is_run():
    names = systems()
    assert "full" in names and all(f"lora_r{r}_{t}" in names for r in (1, 2, 4, 8, 16) for t in ("qv", "attn"))
    assert {"dora_r16_attn", "pissa_r16_attn", "olora_r16_attn"} <= set(names)
    assert names["dora_r16_attn"]["extra"] == ["lora.use_dora=true"] and names["pissa_r16_attn"]["extra"] == ["lora.init=pissa"]
    assert all(len(spec["lrs"]) == 3 for spec in names.values())


def test_variant_rows_are_compared_with_plain_lora_and_full():
    text = " ".join(findings(summarize(RECORDS)))
    assert "dora_r16_attn: test ROUGE-L 48.50 at lr 0.003, plain LoRA 47.00 (+1.50), full fine-tuning 52.00 (-3.50)" in text


def test_rows_use_the_chosen_learning_rate_and_average_seeds():
    rows = {r["system"]: r for r in summarize(RECORDS)}
    assert rows["full"]["seeds"] == 3 and rows["full"]["rougeL"] == pytest.approx(52.0)
    assert rows["full"]["rougeL_spread"] == pytest.approx(4.0)
    assert rows["full"]["sweep"] == {1e-3: 50.0, 3e-3: 40.0}
    assert rows["lora_r1_qv"]["rougeL"] == 45.0 and rows["lora_r1_qv"]["trainable_percent"] == pytest.approx(1.0)


def test_findings_say_where_lora_falls_short_and_catches_up():
    text = " ".join(findings(summarize(RECORDS)))
    assert "lowest rank within 2 ROUGE-L points of full fine-tuning is r=2" in text
    assert "lora_r1_qv fall short" in text


def test_report_writes_markdown_and_plot(tmp_path):
    text = write_report(RECORDS, str(tmp_path), command="python -m bench.quality", wall_s=60,
                        data_dir=os.path.join(ROOT, "data/demo"))
    assert (tmp_path / "QUALITY.md").read_text() == text
    assert (tmp_path / "quality_rouge_vs_params.png").stat().st_size > 1000
    assert "| full | 1,000 (100.00%)" in text and "52.00 ± 2.00" in text and "trivial: first line" in text
