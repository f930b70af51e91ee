"""Merged export and the export CLI."""

import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

import lora_jax
from lora_jax.checkpoints.merged import export_merged
from lora_jax.checkpoints.peft import import_peft
from tests.conftest import MODEL_DIR, PEFT_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _logits(model, params, ref):
    return model.apply({"params": params}, ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"])


def test_merged_export_is_a_plain_checkpoint(tmp_path, tiny, ref):
    adapter, config = import_peft(PEFT_DIR)
    export_merged(str(tmp_path), lora_jax.combine(tiny[1], adapter), config, tiny[0].config, tokenizer_dir=MODEL_DIR)
    assert {"model.safetensors", "flax_model.msgpack", "config.json", "tokenizer.json"} <= set(os.listdir(tmp_path))
    for weights in ("model.safetensors", "flax_model.msgpack"):
        model, params = lora_jax.load_pretrained(str(tmp_path), weights=weights)
        chex.assert_trees_all_close(_logits(model, params, ref), ref["merged_logits"], atol=1e-4, rtol=0)


def test_merged_export_loads_in_transformers_when_torch_is_installed(tmp_path, tiny, ref):
    torch = pytest.importorskip("torch", reason="optional: pip install 'lora_jax[torch]' to load the export in PyTorch")
    from transformers import BartForConditionalGeneration

    adapter, config = import_peft(PEFT_DIR)
    export_merged(str(tmp_path), lora_jax.combine(tiny[1], adapter), config, tiny[0].config, tokenizer_dir=MODEL_DIR)
    model = BartForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ref["input_ids"]), attention_mask=torch.tensor(ref["attention_mask"]),
                       decoder_input_ids=torch.tensor(ref["decoder_input_ids"])).logits.numpy()
    np.testing.assert_allclose(logits, ref["merged_logits"], atol=1e-4)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "train.export", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_peft_round_trip_and_merge(tmp_path, ref):
    out = _cli("--from-peft", PEFT_DIR, "--base", MODEL_DIR, "--adapter-out", tmp_path / "adapter")
    assert out.returncode == 0, out.stderr
    out = _cli("--adapter", tmp_path / "adapter", "--base", MODEL_DIR, "--peft", tmp_path / "peft")
    assert out.returncode == 0, out.stderr
    assert json.load(open(tmp_path / "peft" / "adapter_config.json"))["r"] == 4
    out = _cli("--adapter", tmp_path / "adapter", "--base", MODEL_DIR, "--merged", tmp_path / "merged")
    assert out.returncode == 0, out.stderr
    model, params = lora_jax.load_pretrained(str(tmp_path / "merged"))
    chex.assert_trees_all_close(_logits(model, params, ref), ref["merged_logits"], atol=1e-4, rtol=0)


def test_cli_errors_are_clear(tmp_path):
    assert "--merged" in _cli("--help").stdout
    out = _cli("--adapter", tmp_path / "missing", "--base", MODEL_DIR, "--peft", tmp_path / "p")
    assert out.returncode == 2 and "not a complete lora_jax adapter" in out.stderr
