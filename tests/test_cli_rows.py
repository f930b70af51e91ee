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
    rows.write_text(json.dumps({"source": "a b c", "target": "a"}) + "\n")
    cfg = {"model": {"checkpoint": MODEL_DIR}, "data": {"train_files": str(rows)},
           "train": {"output_dir": str(tmp_path / "out"), "num_steps": 2, "compile_cache_dir": None}}
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
