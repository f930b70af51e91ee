"""The prepared GPU check (`python -m bench.gpu`, bench/gpu_check.sh): its dry run end to end on the CPU (tiny model,
one step; the PyTorch rows run when torch is installed, else are reported skipped), its clear refusal without a GPU,
and the budget and summary logic on hand-made records."""

import json
import os
import subprocess
import sys

import pytest

from bench.gpu import MIN_CHILD_S, child_timeout, gpu_plan
from bench.gpu_report import gpu_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run([SCRIPT, str(out), "--dry-run", "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    return proc, out


def test_dry_run_writes_json_and_markdown(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    markdown = (out / "gpu_check.md").read_text()
    assert result["environment"]["dry_run"] is True and "DRY RUN" in markdown
    for heading in ("#### Checks", "#### Training", "#### 4-beam generation", "#### Targets"):
        assert heading in markdown
    assert [(r["section"], r["system"]) for r in result["records"]] == [
        (s.name, name) for s in gpu_plan(dry_run=True) for name in s.systems]


def test_dry_run_checks_pass_and_cudnn_is_skipped_with_reason(dry_run):
    summary = json.loads((dry_run[1] / "gpu_check.json").read_text())["summary"]
    status = {c["name"]: c["status"] for c in summary["checks"]}
    assert status.pop("cuDNN attention path") == "skipped"
    assert set(status.values()) == {"pass"} and len(status) == 4
    assert summary["ok"] and not summary["errors"]


def test_dry_run_training_and_generation_rows(dry_run):
    summary = json.loads((dry_run[1] / "gpu_check.json").read_text())["summary"]
    rows = {r["system"]: r for r in summary["training"]["train tiny"]["rows"]}
    for system in ("jax_lora", "jax_full"):
        assert rows[system]["tokens_per_s"] > 0 and rows[system]["compile_s"] > 0
        assert rows[system]["mfu"] is None  # CPU: no bf16 peak to divide by
    assert summary["generation"]["generate tiny"]["jax_tokens_per_s"] > 0


def test_refuses_clearly_without_a_gpu(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--out", str(tmp_path / "x")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    if "backend here is 'gpu'" in proc.stderr:
        pytest.skip("this machine has a GPU")
    assert proc.returncode == 2
    assert "no GPU" in proc.stderr and "--dry-run" in proc.stderr
    assert not (tmp_path / "x").exists()  # nothing written


def test_child_timeout_respects_cap_deadline_and_floor():
    assert child_timeout(75, deadline=1000, now=0) == 75
    assert child_timeout(75, deadline=100, now=50) == 50
    assert child_timeout(75, deadline=100, now=100 - MIN_CHILD_S + 1) is None


def test_real_plan_fits_eight_minutes_and_covers_both_sizes():
    plan = gpu_plan(dry_run=False)
    assert {s.spec.model for s in plan if s.name.startswith("train")} == {"base", "large"}
    assert all(s.spec.device == "gpu" for s in plan)
    # The default --budget (420 s) bounds every child; start-up and the report stay well within the other 60 s.
    from bench.gpu import parse_args
    assert parse_args(["--out", "x"]).budget <= 420


def _train(system, step, status="ok"):
    return {"section": "train base", "system": system, "status": status, "kind": "train", "batch": 4, "source_len": 96,
            "target_len": 32, "step_time_s": step, "backend": "gpu", "device": "NVIDIA H200",
            "flops_per_step": 1e12 if system.startswith("jax") else None}


def test_summary_ratios_mfu_and_target():
    records = [{"section": "checks", "system": "gpu_checks", "status": "ok",
                "checks": [{"name": "c", "status": "pass", "value": 0.0, "tolerance": "", "detail": ""}]},
               _train("jax_lora", 0.5), _train("peft_lora", 1.0), _train("jax_full", 1.0),
               {"section": "train base", "system": "torch_full", "status": "error", "reason": "exit code 1"}]
    summary = gpu_summary(records)
    entry = summary["training"]["train base"]
    assert entry["lora_over_peft_tokens_per_s"] == pytest.approx(2.0)
    rows = {r["system"]: r for r in entry["rows"]}
    assert rows["jax_lora"]["tokens_per_s"] == pytest.approx(4 * 128 / 0.5)
    assert rows["jax_lora"]["mfu"] == pytest.approx(1e12 / 0.5 / 989e12)
    assert rows["peft_lora"]["mfu"] == pytest.approx(1e12 / 1.0 / 989e12)  # charged the lora_jax step's FLOPs
    assert summary["targets"][0]["status"] == "met"
    assert summary["errors"] == [{"section": "train base", "system": "torch_full", "reason": "exit code 1"}]
    assert not summary["ok"]  # a failed child fails the check
