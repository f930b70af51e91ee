"""Compile statistics (`lora_jax.training.compile_events`) and JAX's persistent compilation cache as `python -m train`
enables it: a second run of the same config reads its train step from the cache."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from lora_jax.training import compile_events
from lora_jax.training import runtime
from tests.test_train_cli import ROOT, _config, data_dir  # noqa: F401 (data_dir is a fixture)


def test_compile_stats_count_and_time_each_function():
    def double(x):
        return 2 * x

    double.__name__ = compile_events.unique_name("double")
    jitted = jax.jit(double)
    jitted(jnp.ones(3))
    jitted(jnp.ones(3))  # same shape: no new compilation
    jitted(jnp.ones(4))
    stats = compile_events.stats(double.__name__)
    assert stats.compilations == 2 and stats.cache_hits == 0
    assert 0.0 < stats.seconds < 60.0
    assert stats.describe().startswith("2 compilations, ")
    assert compile_events.stats("never_compiled") == compile_events.CompileStats()


def test_enable_compilation_cache_none_is_off(tmp_path):
    assert runtime.enable_compilation_cache(None) is None
    assert runtime.DEFAULT_COMPILATION_CACHE.endswith(os.path.join("lora_jax", "jax_cache"))


def _run(config, cache_dir, output_dir):
    cmd = [sys.executable, "-m", "train", "--config", config, "--set", f"train.compile_cache_dir={cache_dir}",
           "--set", f"train.output_dir={output_dir}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.load(open(os.path.join(output_dir, "summary.json"))), out.stderr


def test_second_run_reads_the_train_step_from_the_persistent_cache(tmp_path, data_dir):  # noqa: F811
    config = _config(tmp_path, data_dir, "cached", num_steps=2, save_every=100)
    cache = tmp_path / "jax_cache"
    first, _ = _run(config, cache, tmp_path / "run1")
    second, log = _run(config, cache, tmp_path / "run2")
    assert first["train_compilations"] >= 1 and first["train_compile_cache_hits"] == 0
    assert os.listdir(cache), "nothing was written to the cache directory"
    # Same programs, so every compilation of the second run's train step is a read from the cache.
    assert second["train_compilations"] == first["train_compilations"]
    assert second["train_compile_cache_hits"] == second["train_compilations"], (first, second)
    assert "from the persistent cache" in log
    print(f"train step compile: {first['train_compile_s']:.2f} s cold, {second['train_compile_s']:.2f} s from the cache")
