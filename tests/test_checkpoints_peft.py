"""PEFT adapters in and out: the fixture adapter made by PEFT 0.21 reproduces PEFT's logits and round-trips."""

import json
import os

import chex
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import lora_jax
from lora_jax.lora import LoraConfig, LoraModel
from lora_jax.checkpoints.peft import export_peft, import_peft, lora_config_from_peft, peft_config
from tests.conftest import MODEL_DIR, PEFT_DIR

MEANINGFUL = ("r", "lora_alpha", "lora_dropout", "peft_type", "task_type", "bias", "use_rslora", "use_dora",
              "rank_pattern", "alpha_pattern", "modules_to_save", "fan_in_fan_out", "layers_to_transform")


@pytest.fixture(scope="module")
def imported():
    return import_peft(PEFT_DIR)


def _logits(model, params, ref):
    return jax.jit(lambda p: model.apply({"params": p}, ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"]))(params)


def test_imported_adapter_reproduces_peft_logits(tiny, ref, imported):
    model, base = tiny
    adapter, config = imported
    assert (config.rank, config.alpha, set(config.targets)) == (4, 8.0, {"q_proj", "v_proj"})
    params = lora_jax.combine(base, adapter)
    chex.assert_trees_all_close(_logits(LoraModel(model, config), params, ref), ref["peft_logits"], atol=1e-4, rtol=0)
    chex.assert_trees_all_close(_logits(model, lora_jax.merge_lora(params, config), ref), ref["merged_logits"], atol=1e-4, rtol=0)


def test_export_reproduces_the_fixture_files(tmp_path, tiny, imported):
    adapter, config = imported
    export_peft(str(tmp_path), lora_jax.combine(tiny[1], adapter), config, "../model")
    ours, theirs = load_file(str(tmp_path / "adapter_model.safetensors")), load_file(os.path.join(PEFT_DIR, "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key].shape == theirs[key].shape and np.array_equal(ours[key], theirs[key]), key
    mine = json.load(open(tmp_path / "adapter_config.json"))
    fixture = json.load(open(os.path.join(PEFT_DIR, "adapter_config.json")))
    assert {k: mine[k] for k in MEANINGFUL} == {k: fixture[k] for k in MEANINGFUL}
    assert set(mine["target_modules"]) == set(fixture["target_modules"])
    assert set(fixture) - set(mine) <= {"peft_version", "alora_invocation_tokens", "arrow_config", "corda_config", "eva_config",
                                        "kasa_config", "lora_ga_config", "monteclora_config", "use_bdlora", "velora_config",
                                        "target_parameters", "trainable_token_indices"}


def test_regex_targets_and_patterns_round_trip():
    config = LoraConfig(rank=8, alpha=16, targets=("decoder/layers/.*/encoder_attn/(q|v)_proj",),
                        rank_pattern={"decoder/layers/1/.*": 4}, alpha_pattern={"q_proj": 32.0}, use_rslora=True)
    exported = peft_config(config, "base")
    assert isinstance(exported["target_modules"], str)
    back = lora_config_from_peft(exported)
    path = "model/decoder/layers/1/encoder_attn/q_proj"
    assert back.is_target(path) and not back.is_target("model/encoder/layers/1/self_attn/q_proj")
    assert back.rank_for(path) == 4 and back.alpha_for(path) == 32.0 and back.use_rslora


def test_modules_to_save_use_plain_pytorch_names(tmp_path, tiny):
    config = LoraConfig(rank=2, targets=("q_proj",), modules_to_save=("layernorm_embedding",))
    params = lora_jax.init_lora(tiny[1], config, jax.random.PRNGKey(0))
    export_peft(str(tmp_path), params, config, "base")
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.encoder.layernorm_embedding.weight" in keys
    adapter, back = import_peft(str(tmp_path))
    chex.assert_trees_all_equal(adapter, jax.tree_util.tree_map(np.asarray, lora_jax.adapter_params(params, config)))
    assert back.modules_to_save == ("layernorm_embedding",)


@pytest.mark.parametrize("field,value,match", [("init_lora_weights", "pissa", "path_initial_model_for_weight_conversion"), ("layer_replication", [[0, 1]], "layer_replication"),
                                               ("bias", "all", "bias='none' only"), ("peft_type", "IA3", "not LoRA")])
def test_unsupported_peft_features_are_refused(field, value, match):
    cfg = json.load(open(os.path.join(PEFT_DIR, "adapter_config.json")))
    cfg[field] = value
    with pytest.raises(ValueError, match=match):
        lora_config_from_peft(cfg)


def test_loads_in_peft_when_installed(tmp_path, tiny, ref, imported):
    torch = pytest.importorskip("torch", reason="optional: pip install 'lora_jax[torch]' to check against PEFT itself")
    peft = pytest.importorskip("peft", reason="optional: pip install 'lora_jax[torch]' to check against PEFT itself")
    from transformers import BartForConditionalGeneration

    adapter, config = imported
    export_peft(str(tmp_path), lora_jax.combine(tiny[1], adapter), config, MODEL_DIR)
    model = peft.PeftModel.from_pretrained(BartForConditionalGeneration.from_pretrained(MODEL_DIR), str(tmp_path)).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ref["input_ids"]), attention_mask=torch.tensor(ref["attention_mask"]),
                       decoder_input_ids=torch.tensor(ref["decoder_input_ids"])).logits.numpy()
    np.testing.assert_allclose(logits, ref["peft_logits"], atol=1e-4)
