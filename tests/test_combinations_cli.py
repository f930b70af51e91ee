"""A few rows of the combination matrix end to end through `python -m train` and `python -m train.summarize`:
a rank / alpha pattern with the default scanned, pre-stacked layers (issue 24's first row), and an NF4 base with DoRA,
rsLoRA, LoRA+, gradient accumulation and remat; the first run's adapter then summarizes rows."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import MODEL_DIR
from tests.test_train_cli import ROOT, _config, _losses, data_dir  # noqa: F401 (data_dir is a fixture)

ROWS = {
    "patterns": ["--set", "lora.rank_pattern={fc1: 8, decoder/layers/1/self_attn/q_proj: 2}",
                 "--set", "lora.alpha_pattern={v_proj: 16}", "--set", "lora.targets=[q_proj, v_proj, fc1]"],
    "nf4_dora": ["--set", "model.quantize=nf4", "--set", "lora.use_dora=true", "--set", "lora.use_rslora=true",
                 "--set", "lora.loraplus_lr_ratio=4", "--set", "optim.grad_accum_steps=2", "--set", "model.remat=dots"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    tmp, out = tmp_path_factory.mktemp("combos"), {}
    for name, settings in ROWS.items():
        config = _config(tmp, data_dir, name, num_steps=3, save_every=3, compile_cache_dir=None)
        proc = subprocess.run([sys.executable, "-m", "train", "--config", config, *settings], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        out[name] = (tmp / name, proc)
    return out


@pytest.mark.parametrize("name", ROWS)
def test_row_trains_and_saves(runs, name):
    out_dir, proc = runs[name]
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["train_compilations"] >= 1
    assert all(np.isfinite(v) for v in _losses(str(out_dir)).values())
    assert (out_dir / "adapter" / "adapter_meta.json").exists()


def test_the_pattern_adapter_summarizes(runs, tmp_path):
    out_dir, proc = runs["patterns"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [{"text": "Return the number of items in a container.", "adapter": "pat"}, {"text": "Open a file."}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = subprocess.run([sys.executable, "-m", "train.summarize", "--base", MODEL_DIR, "--adapter",
                           f"pat={out_dir / 'adapter'}", "--input", str(tmp_path / "in.jsonl"), "--output",
                           str(tmp_path / "out" / "s.jsonl"), "--max-new-tokens", "6", "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = [json.loads(line) for line in (tmp_path / "out" / "s.jsonl").read_text().splitlines()]
    assert [r["text"] for r in got] == [r["text"] for r in rows] and all(isinstance(r["summary"], str) for r in got)
