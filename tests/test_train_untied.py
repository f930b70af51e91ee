"""`python -m train` and `python -m train.export` on an untied base: full fine-tuning saves an untied model that reloads
untied, and a LoRA adapter exports merged (untied) and to PEFT."""

import json
import os
import sys

import numpy as np
import pytest

import lora_jax
from lora_jax.models.tying import LM_HEAD, SHARED
from lora_jax.tree import flatten_tree
from tests.conftest import MODEL_DIR
from tests.test_train_cli import _config, _run, data_dir  # noqa: F401 (data_dir is a fixture)


@pytest.fixture(scope="module")
def untied_base(tmp_path_factory):
    """tiny-bart untied, with a head of its own (shared + 0.05 noise, transposed), saved with its tokenizer."""
    model, params = lora_jax.load_pretrained(MODEL_DIR)
    params = lora_jax.untie_embeddings(params)
    noise = np.random.default_rng(0).normal(0, 0.05, params["lm_head"]["kernel"].shape).astype(np.float32)
    params["lm_head"] = {"kernel": np.asarray(params["lm_head"]["kernel"]) + noise}
    out = str(tmp_path_factory.mktemp("untied") / "base")
    lora_jax.save_pretrained(out, params, model.config, tokenizer_dir=MODEL_DIR,
                             generation_config=json.load(open(os.path.join(MODEL_DIR, "generation_config.json"))))
    return out


def _untied_model(directory):
    model, params = lora_jax.load_pretrained(directory)
    flat = flatten_tree(params)
    assert model.config.tie_word_embeddings is False
    assert not np.allclose(np.asarray(flat[LM_HEAD]).T, np.asarray(flat[SHARED]))
    return model, params


def test_full_fine_tuning_saves_an_untied_model(tmp_path, data_dir, untied_base):  # noqa: F811
    cfg = _config(tmp_path, data_dir, "full", num_steps=2, save_every=100)
    _run([sys.executable, "-m", "train", "--config", cfg, "--set", "lora.mode=full", "--set", f"model.checkpoint={untied_base}"])
    _, before = _untied_model(untied_base)
    _, after = _untied_model(str(tmp_path / "full" / "model"))
    assert not np.allclose(np.asarray(after["lm_head"]["kernel"]), np.asarray(before["lm_head"]["kernel"]))  # it trained


def test_lora_adapter_exports_merged_and_peft_on_an_untied_base(tmp_path, data_dir, untied_base):  # noqa: F811
    cfg = _config(tmp_path, data_dir, "lora", num_steps=2, save_every=100)
    _run([sys.executable, "-m", "train", "--config", cfg, "--set", f"model.checkpoint={untied_base}"])
    adapter = str(tmp_path / "lora" / "adapter")
    _run([sys.executable, "-m", "train.export", "--adapter", adapter, "--base", untied_base, "--merged", str(tmp_path / "merged")])
    _run([sys.executable, "-m", "train.export", "--adapter", adapter, "--base", untied_base, "--peft", str(tmp_path / "peft")])
    model, merged = _untied_model(str(tmp_path / "merged"))
    base_model, base = lora_jax.load_pretrained(untied_base)
    loaded, config, _ = lora_jax.load_adapter(adapter, base_params=base)
    expected = lora_jax.merge_lora(lora_jax.combine(base, loaded), config)
    assert np.array_equal(np.asarray(merged["lm_head"]["kernel"]), np.asarray(expected["lm_head"]["kernel"]))
    peft_adapter, peft_config = lora_jax.import_peft(str(tmp_path / "peft"))
    assert peft_config.targets == config.targets and peft_config.rank == config.rank
