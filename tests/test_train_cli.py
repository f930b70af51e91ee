"""`python -m train` end to end on the fixture model: outputs, kill -9 and resume, SIGTERM, resume safety, the
divergence guard, the output-dir lock."""

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import FIXTURE, MODEL_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    texts = json.load(open(os.path.join(FIXTURE, "reference_texts.json")))
    rows = [{"source": s, "target": t} for s, t in zip(texts["sources"], texts["targets"])]
    with open(d / "train.jsonl", "w") as f:
        for i in range(6):
            for r in rows:
                f.write(json.dumps({"source": f"{r['source']} ({i})", "target": r["target"]}) + "\n")
    with open(d / "eval.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return d


def _config(tmp_path, data_dir, name, **train):
    train = {"batch_size": 4, "eval_batch_size": 4, "num_steps": 10, "eval_every": 100, "save_every": 2, "log_every": 1,
             "output_dir": str(tmp_path / name), **train}
    cfg = {
        "model": {"checkpoint": MODEL_DIR},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.1},
        "data": {"train_files": str(data_dir / "train.jsonl"), "max_source_length": 64, "max_target_length": 16},
        "optim": {"learning_rate": 0.005, "warmup_steps": 2},
        "train": train,
        "eval": {"rouge_before": False, "num_beams": 2, "max_new_tokens": 12},
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return str(path)


def _cmd(config, *extra):
    return [sys.executable, "-m", "train", "--config", config, *extra]


def _losses(output_dir):
    losses = {}
    for line in open(os.path.join(output_dir, "metrics.jsonl")):
        r = json.loads(line)
        if r["split"] == "train":
            losses[r["step"]] = r["loss"]  # a replayed step after a resume overwrites the killed run's record
    return losses


def _run(cmd):
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _wait_for_step(output_dir, step, proc, timeout=300):
    path = os.path.join(output_dir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and max(_losses(output_dir), default=0) >= step:
            return
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("runs")
    config = _config(tmp, data_dir, "full_run", eval_every=5)
    with open(config) as f:
        cfg = json.load(f)
    cfg["data"]["eval_files"] = str(data_dir / "eval.jsonl")
    open(config, "w").write(json.dumps(cfg))
    out = _run(_cmd(config))
    return tmp / "full_run", out


def test_run_writes_everything_a_user_needs(uninterrupted):
    out_dir, proc = uninterrupted
    for name in ("metrics.jsonl", "summary.json", "loss_curve.png", "samples.txt", "predictions.jsonl", "config.json"):
        assert (out_dir / name).exists(), name
    assert list((out_dir / "tensorboard").iterdir())
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["trainable_params"] == 3072
    assert 1 <= summary["train_compilations"] <= summary["batch_shapes_possible"]
    assert set(summary["rouge_after"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert (out_dir / "adapter" / "adapter_meta.json").exists() and summary["saved"]["bytes"] < 200_000
    assert "trainable params: 3,072" in proc.stdout


def test_kill_9_mid_run_then_resume_gives_the_same_losses(tmp_path, data_dir, uninterrupted):
    reference = _losses(uninterrupted[0])
    config = _config(tmp_path, data_dir, "killed")
    proc = subprocess.Popen(_cmd(config), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_step(tmp_path / "killed", 5, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = max(_losses(tmp_path / "killed"))
    assert killed_at < 10
    out = _run(_cmd(config))
    assert "resumed from step" in out.stderr
    assert "taking over the lock" in out.stderr  # the killed run's lock: its pid is gone
    resumed = _losses(tmp_path / "killed")
    assert sorted(resumed) == list(range(1, 11))
    np.testing.assert_array_equal([resumed[s] for s in range(1, 11)], [reference[s] for s in range(1, 11)])
    records = [json.loads(line) for line in open(tmp_path / "killed" / "metrics.jsonl")]
    counts = collections.Counter((r["step"], r["split"]) for r in records if r["split"] == "train")
    assert counts == {(s, "train"): 1 for s in range(1, 11)}  # replayed steps were superseded, not appended
    assert not (tmp_path / "killed" / ".lock").exists()


def test_sigterm_saves_and_stops_then_resumes(tmp_path, data_dir):
    config = _config(tmp_path, data_dir, "preempted", num_steps=300, save_every=1000, log_every=1)
    proc = subprocess.Popen(_cmd(config), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(tmp_path / "preempted", 3, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert proc.returncode == 143 and summary["stopped_early"] is True and summary["steps"] < 300
    assert os.listdir(tmp_path / "preempted" / "checkpoints") == [str(summary["steps"])]
    saved = json.loads((tmp_path / "preempted" / "summary.json").read_text())
    assert saved["status"] == "stopped_early" and "adapter" not in os.listdir(tmp_path / "preempted")
    checkpoint = str(tmp_path / "preempted" / "checkpoints" / str(summary["steps"]))
    error = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert error == [f"error: stopped by SIGTERM after step {summary['steps']} of 300; the checkpoint is saved at "
                     f"{checkpoint}; run the same command again to resume"]
    out = _run(_cmd(config, "--set", "train.num_steps=300"))
    assert f"resumed from step {summary['steps']}" in out.stderr
    assert max(_losses(tmp_path / "preempted")) == 300


def test_config_errors_exit_before_any_work(tmp_path, data_dir):
    config = _config(tmp_path, data_dir, "bad")
    out = subprocess.run(_cmd(config, "--set", "lora.rnak=4"), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "did you mean 'lora.rank'" in out.stderr
    assert not (tmp_path / "bad").exists()


def test_missing_column_is_reported_by_key(tmp_path, data_dir):
    config = _config(tmp_path, data_dir, "badcol")
    out = subprocess.run(_cmd(config, "--set", "data.target_column=summary"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and f"data.target_column: data file {data_dir / 'train.jsonl'} has no column 'summary'" in out.stderr


def test_resume_with_another_config_is_refused_unless_asked_for(tmp_path, data_dir, uninterrupted):
    shutil.copytree(uninterrupted[0], tmp_path / "again")
    config = _config(tmp_path, data_dir, "again")
    before = sorted(os.listdir(tmp_path / "again" / "checkpoints"))
    out = subprocess.run(_cmd(config, "--set", "lora.alpha=4"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "lora.alpha: 8.0 -> 4.0" in error[0]
    assert "--resume-with-changes" in error[0] and "train.output_dir" in error[0]
    assert sorted(os.listdir(tmp_path / "again" / "checkpoints")) == before
    # keys that do not change training may differ
    _run(_cmd(config, "--set", "train.log_every=3", "--set", "eval.num_beams=1", "--set", "eval.rouge_before=true"))
    out = _run(_cmd(config, "--set", "lora.alpha=4", "--set", "train.num_steps=12", "--resume-with-changes"))
    summary = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["resume_changes"][0]["step"] == 10
    assert summary["resume_changes"][0]["changes"] == {"lora.alpha": [8.0, 4.0], "train.num_steps": [10, 12]}


def test_a_diverging_run_stops_nonzero_and_keeps_its_last_good_checkpoint(tmp_path, data_dir):
    config = _config(tmp_path, data_dir, "diverged", save_every=1, log_every=1)
    out = subprocess.run(_cmd(config, "--set", "optim.learning_rate=1e6"), cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 3, out.stderr[-2000:]
    error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "training diverged at step" in error[0] and "last good checkpoint is step 1" in error[0]
    summary = json.loads((tmp_path / "diverged" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["last_good_checkpoint"] == 1
    assert not (tmp_path / "diverged" / "adapter").exists()
    assert os.listdir(tmp_path / "diverged" / "checkpoints").count("1") == 1
    # the good checkpoint is intact: continue from it at a sane learning rate
    out = _run(_cmd(config, "--resume-with-changes"))
    assert "resumed from step 1" in out.stderr
    summary = json.loads((tmp_path / "diverged" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["last_train_metrics"]["loss"] < 1.0


def test_a_second_run_into_the_same_output_dir_fails_at_once(tmp_path, data_dir):
    config = _config(tmp_path, data_dir, "busy", num_steps=1_000_000, save_every=1_000_000, log_every=1)
    proc = subprocess.Popen(_cmd(config), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_step(tmp_path / "busy", 2, proc)
        second = subprocess.run(_cmd(config), cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.poll() is None  # the first run goes on
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    error = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert second.returncode == 2 and len(error) == 1 and f"in use by another run (pid {proc.pid} on " in error[0]
    assert "train.output_dir" in error[0]



def test_run_on_a_quantised_bfloat16_base(tmp_path, data_dir):
    """model.quantize and model.param_dtype from the command line: NF4 kernels, bfloat16 embedding and norms, float32
    adapters written to the adapter directory; the run trains (finite losses) and evaluates."""
    config = _config(tmp_path, data_dir, "nf4_run", num_steps=4)
    _run(_cmd(config, "--set", "model.quantize=nf4", "--set", "model.param_dtype=bfloat16"))
    out_dir = tmp_path / "nf4_run"
    losses = _losses(str(out_dir))
    assert len(losses) == 4 and all(np.isfinite(v) for v in losses.values())
    meta = json.loads((out_dir / "adapter" / "adapter_meta.json").read_text())
    assert {leaf["dtype"] for leaf in meta["leaves"].values()} == {"float32"}
    assert json.loads((out_dir / "config.json").read_text())["model"]["quantize"] == "nf4"


@pytest.mark.parametrize("variant", [["--set", "lora.init=pissa"], ["--set", "lora.use_dora=true"]], ids=["pissa", "dora"])
def test_variants_train_and_save_an_adapter_for_the_untouched_base(tmp_path, data_dir, variant):
    import lora_jax

    config = _config(tmp_path, data_dir, "variant", num_steps=6, save_every=3)
    _run(_cmd(config, *variant))
    summary = json.loads((tmp_path / "variant" / "summary.json").read_text())
    assert summary["status"] == "finished" and np.isfinite(summary["last_train_metrics"]["loss"])
    _, base = lora_jax.load_pretrained(MODEL_DIR)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the base fingerprint matches the untouched base: no warning
        adapter, config, _ = lora_jax.load_adapter(str(tmp_path / "variant" / "adapter"), base_params=base)
    q = adapter["model"]["encoder"]["layers"]["0"]["self_attn"]["q_proj"]
    if "lora.init=pissa" in variant:
        assert config.rank == 8 and config.init == "gaussian" and q["lora_a"].shape == (32, 8)  # converted: rank 2r
    else:
        assert config.use_dora and q["lora_magnitude"].shape == (32,)
