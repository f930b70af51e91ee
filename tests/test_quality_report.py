"""bench.quality: the rows of the table, sweeps that extend past an edge, rows and findings from run records with
bootstrap intervals, QUALITY.md with its plot, and a --quick smoke run of the whole command."""

import json
import os

import pytest

from bench.quality import at_best_rank, dependencies, main, mirroring, spec_at_run_time, systems
from bench.quality_report import summarize, write_report
from bench.quality_findings import findings
from bench.quality_sweep import GRID, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QV, ALL = ["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
N = 60  # test examples per record


def _record(system, lr, seed, rouge_l, chosen, trainable, rank=None, targets=None, mode="lora", spread=10.0):
    scores = {"rouge1": rouge_l + 5, "rouge2": rouge_l - 10, "rougeL": rouge_l, "rougeLsum": rouge_l}
    # per-example scores whose mean is rouge_l: half at rouge_l - spread, half at rouge_l + spread
    per = {k: [v - spread if i % 2 else v + spread for i in range(N)] for k, v in scores.items() if k != "rougeLsum"}
    return {"system": system, "mode": mode, "rank": rank, "targets": targets, "learning_rate": lr, "seed": seed,
            "steps": 10, "eval_loss": 1.0, "validation": scores, "test": scores if chosen else None,
            "test_per_example": per, "train_wall_s": 5.0, "trainable_params": trainable, "total_params": 1000,
            "train_compilations": 1, "chosen": chosen, "edge": False, "peak_rss_bytes": 2**30,
            "test_samples": [{"prediction": "a tool", "reference": "a tool for x"}]}


RECORDS = [
    _record("full", 1e-3, 0, 50.0, True, 1000, mode="full"), _record("full", 3e-3, 0, 40.0, False, 1000, mode="full"),
    _record("full", 1e-3, 1, 52.0, True, 1000, mode="full"), _record("full", 1e-3, 2, 54.0, True, 1000, mode="full"),
    _record("lora_r1_qv", 1e-2, 0, 40.0, True, 10, 1, QV, spread=1.0), _record("lora_r1_qv", 1e-3, 0, 30.0, False, 10, 1, QV),
    _record("lora_r2_qv", 1e-2, 0, 51.5, True, 20, 2, QV),
    _record("lora_r16_all", 1e-2, 0, 47.0, True, 40, 16, ALL), _record("dora", 3e-3, 0, 48.5, True, 41, 16, ALL),
    _record("peft", 1e-2, 0, 51.0, True, 20, 2, QV, mode="peft"),
]
BASELINES = {split: {"first 7 words": {k: v for m in ("rouge1", "rouge2", "rougeL") for k, v in
                                       ((m, 30.0), (m + "_low", 29.0), (m + "_high", 31.0))}}
             for split in ("validation", "test")}


def test_every_row_of_the_paper_table_is_run():
    names = systems()
    assert "full" in names and all(f"lora_r{r}_{t}" in names for r in (1, 2, 4, 8, 16) for t in ("qv", "all"))
    assert names["lora_r4_all"]["targets"] == ALL and {"dora", "pissa", "peft"} <= set(names)
    assert names["dora"]["extra"] == ["lora.use_dora=true"] and names["pissa"]["extra"] == ["lora.init=pissa"]


def test_variants_and_peft_take_the_best_validation_rank():
    spec = at_best_rank({**systems()["peft"], "name": "peft"}, RECORDS)
    assert (spec["rank"], spec["targets"], spec["lrs"], spec["best_lora"]) == (2, QV, [1e-2], "lora_r2_qv")
    assert at_best_rank({**systems()["dora"], "name": "dora"}, RECORDS)["lrs"] == systems()["dora"]["lrs"]
    with pytest.raises(SystemExit, match="best LoRA rank"):
        at_best_rank({**systems()["dora"], "name": "dora"}, RECORDS[:4])


def test_peft_mirrors_the_config_row_and_variants_wait_for_every_lora_row():
    names = ["full", "lora_r1_qv", "lora_r2_qv", "lora_r16_all", "peft", "dora"]
    assert dependencies("peft", names) == ["lora_r16_all"] and dependencies("full", names) == []
    assert dependencies("dora", names) == ["lora_r1_qv", "lora_r2_qv", "lora_r16_all"]
    assert dependencies("peft", ["lora_r1_qv", "peft"]) == ["lora_r1_qv"]  # no config row: it waits for the best
    spec = spec_at_run_time({**systems()["peft"], "name": "peft"}, RECORDS, names)
    assert (spec["rank"], spec["targets"], spec["lrs"], spec["best_lora"]) == (16, ALL, [1e-2], "lora_r16_all")
    assert spec_at_run_time({**systems()["peft"], "name": "peft"}, RECORDS, ["lora_r2_qv", "peft"])["rank"] == 2
    with pytest.raises(SystemExit, match="run lora_r16_all before it"):
        mirroring({**systems()["peft"], "name": "peft"}, RECORDS[:4], "lora_r16_all")


def test_sweep_extends_past_an_edge_until_the_best_rate_is_interior():
    tried = []

    def peaked(lr):  # best at 3e-2, beyond the start's top edge
        tried.append(lr)
        return -abs(GRID.index(lr) - GRID.index(3e-2))

    result = sweep(peaked, [1e-3, 3e-3, 1e-2])
    assert result.best == 3e-2 and not result.edge and tried == [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    down = sweep(lambda lr: -lr, [1e-3, 3e-3, 1e-2], max_extensions=2)
    assert down.best == 1e-4 and down.edge and sorted(down.scores) == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    flat = sweep(lambda lr: 1.0, [1e-3, 3e-3, 1e-2])  # ties: the middle rate, no extension
    assert flat.best == 3e-3 and not flat.edge and len(flat.scores) == 3
    with pytest.raises(ValueError, match="not on the sweep grid"):
        sweep(lambda lr: lr, [2e-3, 5e-3])


def test_rows_average_seeds_and_carry_a_bootstrap_interval():
    rows = {r["system"]: r for r in summarize(RECORDS)}
    full = rows["full"]
    assert full["seeds"] == 3 and full["rougeL"] == pytest.approx(52.0) and full["rougeL_spread"] == pytest.approx(4.0)
    assert full["rougeL_low"] < 52.0 < full["rougeL_high"] and full["rougeL_high"] - full["rougeL_low"] < 6.0
    narrow = rows["lora_r1_qv"]
    assert narrow["rougeL_high"] - narrow["rougeL_low"] < 0.2 * (full["rougeL_high"] - full["rougeL_low"])
    assert full["sweep"] == {1e-3: 50.0, 3e-3: 40.0} and narrow["trainable_percent"] == pytest.approx(1.0)


def test_findings_read_the_goals_off_the_intervals():
    text = " ".join(findings(summarize(RECORDS), BASELINES))
    assert "LoRA on q,v: from r=2 (51.50" in text and "intervals apart from full's: r=1 (40.00)" in text
    assert "Goal met: LoRA (r <= 16) within 1 ROUGE-L point" in text and "lora_r2_qv" in text
    assert "Goal met: best LoRA row lora_r2_qv 51.50 is +21.50 ROUGE-L from the best baseline (first 7 words" in text
    assert "Goal met: lora_jax lora_r2_qv 51.50 is inside PEFT's interval 51.00" in text
    assert "dora (r=16): test ROUGE-L 48.50 at lr 0.003; plain LoRA 47.00 (+1.50" in text
    no_peft = " ".join(findings(summarize(RECORDS[:-1]), BASELINES))
    assert "Not measured: the PEFT row" in no_peft


def test_report_writes_markdown_and_plot(tmp_path):
    text = write_report(RECORDS, str(tmp_path), command="python -m bench.quality", wall_s=60,
                        config=os.path.join(ROOT, "configs", "synopsis.yaml"), baselines=BASELINES)
    assert (tmp_path / "QUALITY.md").read_text() == text
    assert (tmp_path / "quality_rouge_vs_params.png").stat().st_size > 1000
    assert "| full | full fine-tuning | 1,000 (100.00%) | 57.00 [" in text and "baseline: first 7 words" in text
    assert "index dates: bookworm-security" in text and "prediction: 'a tool'" in text


def test_quick_run_writes_a_report_end_to_end(tmp_path):
    main(["--quick", "--out-dir", str(tmp_path)])
    records = [json.loads(line) for line in open(tmp_path / "quality.jsonl")]
    assert len(records) == 1 and records[0]["chosen"] and records[0]["learning_rate"] == 3e-3
    chosen = records[0]
    assert chosen["test"]["examples"] == 8 and len(chosen["test_per_example"]["rougeL"]) == 8
    assert chosen["train_compilations"] >= 1 and chosen["peak_rss_bytes"] > 0
    text = (tmp_path / "QUALITY.md").read_text()
    assert "Quick smoke run: not a measurement" in text and "| lora_r2_qv | r=2, q,v |" in text


def test_peft_side_uses_lora_jax_learning_rate_schedule():
    import lora_jax
    from bench.quality_torch import lr_lambda

    for warmup, total, kind in ((30, 100, "linear"), (0, 50, "cosine"), (10, 40, "constant"), (200, 100, "linear")):
        ours, theirs = lora_jax.learning_rate_schedule(2e-3, total, warmup, kind), lr_lambda(warmup, total, kind)
        for s in (0, 1, 9, 29, 30, 31, 60, 99):
            assert float(ours(s)) == pytest.approx(2e-3 * theirs(s), abs=1e-9), (warmup, total, kind, s)
