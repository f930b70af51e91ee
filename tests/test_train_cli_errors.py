"""`python -m train` and `python -m train.evaluate` on bad input: exit code 2 and one error line, never a traceback."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import MODEL_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, config, *extra):
    out = subprocess.run([sys.executable, "-m", module, "--config", str(config), *extra], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    errors = [line for line in out.stderr.splitlines() if re.search("error", line, re.IGNORECASE)]
    return out, errors


def _config(tmp_path, train_files, **train):
    cfg = {"model": {"checkpoint": MODEL_DIR}, "data": {"train_files": str(train_files)},
           "train": {"output_dir": str(tmp_path / "out"), "num_steps": 2, **train}}
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture
def rows(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"source": "a b c", "target": "a"}) + "\n")
    return path


@pytest.mark.parametrize(
    "setting,line",
    [
        (["--set", "train.save_every=0"], "config error: config key 'train.save_every' must be >= 1, got 0"),
        (["--set", "optim.learning_rate=.nan"], "config error: config key 'optim.learning_rate' must be a finite number, got nan"),
    ],
)
def test_bad_config_value_is_one_line_and_exit_code_2(tmp_path, rows, setting, line):
    out, errors = _run("train", _config(tmp_path, rows), *setting)
    assert out.returncode == 2 and errors == [line], out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "out").exists()


def test_config_file_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- model\n- data\n")
    out, errors = _run("train", path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert errors == [f"config error: config file '{path}' must hold a mapping of sections (model:, data:, ...), got a list"]


def test_empty_data_file_is_one_line_and_exit_code_2(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    out, errors = _run("train", _config(tmp_path, empty))
    assert out.returncode == 2, out.stderr
    assert len(errors) == 1 and errors[0].startswith(
        f"error: data file {empty} is empty (0 bytes): remove it from the data files or fill it"), out.stderr
    assert "Traceback" not in out.stderr


def test_non_text_values_stop_the_run_naming_the_row(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"source": "a b", "target": "a"}) + "\n" + json.dumps({"source": [1, 2], "target": "b"}) + "\n")
    out, errors = _run("train", _config(tmp_path, path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(errors) == 1 and errors[0].startswith(f"error: data file {path}, row 2, column 'source' (data.source_column)")


def test_evaluate_with_a_damaged_adapter_is_one_line(tmp_path, rows, tiny):
    import jax

    import lora_jax

    config = lora_jax.LoraConfig(rank=2, alpha=4)
    params = lora_jax.init_lora(tiny[1], config, jax.random.PRNGKey(0))
    adapter = lora_jax.save_adapter(str(tmp_path / "adapter"), params, config)
    meta = tmp_path / "adapter" / "adapter_meta.json"
    meta.write_bytes(meta.read_bytes()[:50])
    out, errors = _run("train.evaluate", _config(tmp_path, rows), "--adapter", adapter, "--split", "eval")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(errors) == 1 and errors[0].startswith(f"error: {meta} is not valid JSON ("), out.stderr


def test_batch_that_does_not_divide_over_the_devices_is_one_line(tmp_path, rows):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    out = subprocess.run([sys.executable, "-m", "train", "--config", str(_config(tmp_path, rows, batch_size=6))],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "train.batch_size=6 does not divide over the mesh's 4 devices" in out.stderr
    assert "multiple of 4" in out.stderr
