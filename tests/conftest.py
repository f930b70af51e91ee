"""Shared fixtures: the tiny reference BART (loaded once per session) and its reference arrays."""

import dataclasses
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import lora_jax

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny-bart")
MODEL_DIR = os.path.join(FIXTURE, "model")
PEFT_DIR = os.path.join(FIXTURE, "peft_adapter")
BATCH_KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "labels")


@pytest.fixture(scope="session")
def ref():
    return dict(np.load(os.path.join(FIXTURE, "reference.npz")))


@pytest.fixture(scope="session")
def tiny():
    """(model, params) of the fixture checkpoint."""
    return lora_jax.load_pretrained(MODEL_DIR)


@pytest.fixture(scope="session")
def tiny_no_dropout(tiny):
    """The fixture model with dropout off, for tests that compare training runs exactly."""
    model, params = tiny
    config = dataclasses.replace(model.config, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    return lora_jax.BartForConditionalGeneration(config), params


@pytest.fixture(scope="session")
def batch(ref):
    return {k: jnp.asarray(ref[k], jnp.int32) for k in BATCH_KEYS}


def peft_adapter_tree() -> dict:
    """The fixture PEFT adapter as our adapter tree (lora_a = lora_A.T, lora_b = lora_B.T)."""
    from flax import traverse_util

    flat = {}
    for key, value in load_file(os.path.join(PEFT_DIR, "adapter_model.safetensors")).items():
        parts = key.removeprefix("base_model.model.").split(".")
        leaf = {"lora_A": "lora_a", "lora_B": "lora_b"}[parts[-2]]
        flat[tuple(parts[:-2]) + (leaf,)] = value.T
    return traverse_util.unflatten_dict(flat)


# Test modules that start Python processes (the command-line tools end to end, simulated hosts, benchmarks, the docs'
# examples): most of the suite's time. `python -m pytest -m "not slow"` runs the rest (CONTRIBUTING.md).
SLOW_MODULES = frozenset({
    "test_bench_smoke", "test_checkpoints_merged", "test_compile_cache", "test_multi_adapter_bench", "test_readme",
    "test_sharding", "test_summarize_cli", "test_train_cli", "test_train_cli_errors", "test_train_untied",
    "test_multihost", "test_export_cli_directories", "test_gpu_check", "test_combinations", "test_combinations_cli",
    "test_cli_rows", "test_quality_report", "test_supervise",
})


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
