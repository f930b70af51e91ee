"""Issue 24's command-line rows: each bad setting is one clear line before any training work, and what is optional
(the compilation cache) degrades to a warning instead of killing the run."""

import json
import os
import warnings

import jax
import pytest

from lora_jax.training import runtime
from tests.conftest import MODEL_DIR
from train import analyze
from train.__main__ import main as train_main

LIMIT = 128  # the fixture model's max_position_embeddings


@pytest.fixture
def config(tmp_path):
    rows = tmp_path / "train.jsonl"
    rows.write_text("".join(json.dumps({"source": f"a b c {i}", "target": "a"}) + "\n" for i in range(2)))
    cfg = {"model": {"checkpoint": MODEL_DIR}, "data": {"train_files": str(rows)}, "eval": {"rouge_before": False},
           "train": {"output_dir": str(tmp_path / "out"), "num_steps": 2, "batch_size": 2, "compile_cache_dir": None}}
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(cfg))
    return str(path)


def _error_lines(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("key", ["data.max_source_length", "data.max_target_length"])
def test_lengths_over_the_model_positions_are_refused_before_training(tmp_path, config, capsys, key):
    assert train_main(["--config", config, "--set", f"{key}=100000"]) == 2
    errors = _error_lines(capsys)
    assert len(errors) == 1 and f"{key}=100000 exceeds the model's max_position_embeddings ({LIMIT})" in errors[0]
    assert f"set {key} <= {LIMIT}" in errors[0]
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN attention runs on a GPU")
def test_cudnn_attention_without_a_gpu_is_one_line(tmp_path, config, capsys):
    assert train_main(["--config", config, "--set", "model.attention=cudnn"]) == 2
    errors = _error_lines(capsys)
    assert len(errors) == 1 and "model.attention='cudnn' needs an NVIDIA GPU" in errors[0]
    assert "model.attention=null" in errors[0]
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_an_unwritable_compile_cache_warns_and_runs_without_it(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    before = jax.config.jax_compilation_cache_dir
    with pytest.warns(UserWarning, match=r"train.compile_cache_dir .*a_file/cache.* cannot be written .* without"):
        assert runtime.enable_compilation_cache(str(blocker / "cache")) is None
    assert jax.config.jax_compilation_cache_dir == before


def test_analyze_names_a_bad_layers_regex(tmp_path, capsys):
    assert analyze.main(["--adapter", str(tmp_path / "none"), "--layers", "([", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --layers '([' is not a valid regex: ") and "Traceback" not in err


def test_resume_with_changes_that_alter_shapes_is_one_line(tmp_path, config, capsys):
    """The failed restore of a checkpoint whose arrays no longer fit (lora.rank 4 -> 8) is the error line only:
    none of the asyncio reports of the reads it abandoned ("Event loop is closed", "Task exception was never
    retrieved")."""
    import subprocess
    import sys

    assert train_main(["--config", config, "--set", "lora.rank=4", "--set", "train.num_steps=1",
                       "--set", "train.save_every=1"]) == 0
    capsys.readouterr()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "train", "--config", config, "--set", "lora.rank=8",
                          "--resume-with-changes"], cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not fit this run's arrays" in errors[0]
