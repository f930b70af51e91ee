"""PEFT import is strict: every LoraConfig field is honoured, refused or warned about (a table, checked against the
recorded PEFT field list); exclude_modules and targeted modules without weights follow PEFT; a lora_jax-exported PEFT
adapter carries its base fingerprint, and another base warns."""

import dataclasses
import json
import os
import shutil
import warnings

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lora_jax
from lora_jax.checkpoints.peft import BASE_NAME, export_peft, import_peft, load_any_adapter
from lora_jax.checkpoints.peft_fields import HONOURED, PEFT_LORA_FIELDS
from tests.conftest import MODEL_DIR, PEFT_DIR

FIELDS = os.path.join(os.path.dirname(__file__), "fixtures", "peft_lora_config_fields.json")
LAYER0_Q = "model/encoder/layers/0/self_attn/q_proj"
LAYER0_Q_KEYS = ("base_model.model.model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
                 "base_model.model.model.encoder.layers.0.self_attn.q_proj.lora_B.weight")


def _adapter(tmp_path, drop=(), **changes):
    """A copy of the tiny-bart PEFT fixture (r=4, alpha 8, q_proj + v_proj) with config fields changed and the
    weights `drop` removed."""
    out = tmp_path / "adapter"
    shutil.copytree(PEFT_DIR, out)
    cfg = json.load(open(out / "adapter_config.json"))
    cfg.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    if drop:
        state = load_file(str(out / "adapter_model.safetensors"))
        save_file({k: v for k, v in state.items() if k not in drop}, str(out / "adapter_model.safetensors"))
    return str(out)


def _quiet(fn, *args, **kwargs):
    """fn's result and the messages of the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in caught]


def test_every_field_of_the_newest_peft_is_classified():
    recorded = json.load(open(FIELDS))["fields"]
    assert set(recorded) - set(PEFT_LORA_FIELDS) == set(), "classify these in peft_fields.PEFT_LORA_FIELDS"
    assert set(PEFT_LORA_FIELDS) - set(recorded) == set(), "the table names fields PEFT does not have"
    try:
        import peft
    except ImportError:
        return
    installed = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert installed - set(PEFT_LORA_FIELDS) == set(), (f"PEFT {peft.__version__} has fields the table does not "
                                                         "classify; run scripts/record_peft_fields.py and classify them")


@pytest.mark.parametrize("field,value", [
    ("alora_invocation_tokens", [50, 51]), ("arrow_config", {"top_k": 3}), ("init_lora_weights", "loftq"),
    ("init_lora_weights", "corda"), ("kasa_config", {"beta": 1e-4}), ("monteclora_config", {"n": 2}),
    ("use_bdlora", {"nblocks": 2}), ("megatron_config", {"tp": 2}), ("fan_in_fan_out", True),
    ("a_field_from_a_future_peft", {"on": True}), ("task_type", "NOT_A_TASK"),
])
def test_features_lora_jax_cannot_compute_are_refused_naming_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"PEFT adapter: .*{field.split('_')[0]}"):
        import_peft(_adapter(tmp_path, **{field: value}))


@pytest.mark.parametrize("field,value,match", [("task_type", "CAUSAL_LM", "CAUSAL_LM"),
                                               ("velora_config", {"rank": 2}, "velora_config")])
def test_same_computation_in_peft_warns_and_loads(tmp_path, field, value, match):
    (adapter, config), messages = _quiet(import_peft, _adapter(tmp_path, **{field: value}))
    assert any(match in m for m in messages), messages
    assert config.rank == 4 and set(config.targets) == {"q_proj", "v_proj"}


def test_velora_adapter_loads_without_its_training_buffers(tmp_path):
    directory = _adapter(tmp_path, velora_config={"init_type": "batch_average", "num_groups": 64, "scale": 1.0})
    state = load_file(os.path.join(directory, "adapter_model.safetensors"))
    state["base_model.model.model.encoder.layers.0.self_attn.q_proj.lora_velora_embed"] = np.ones((1, 16), np.float32)
    save_file(state, os.path.join(directory, "adapter_model.safetensors"))  # as PEFT 0.21.2 saves a VeLoRA adapter
    (adapter, _), messages = _quiet(import_peft, directory)
    assert any("velora_config" in m for m in messages), messages
    assert set(adapter["model"]["encoder"]["layers"]["0"]["self_attn"]["q_proj"]) == {"lora_a", "lora_b"}


def test_unknown_field_switched_off_and_honoured_inits_load_quietly(tmp_path):
    for init in (True, None, "gaussian", "eva", "orthogonal", "mica"):
        shutil.rmtree(tmp_path / "adapter", ignore_errors=True)
        _, messages = _quiet(import_peft, _adapter(tmp_path, init_lora_weights=init, a_future_config=None))
        assert not [m for m in messages if "PEFT" in m], (init, messages)


@pytest.mark.parametrize("field,value", [("lora_dropout", "abc"), ("lora_dropout", 1.5), ("r", "4"),
                                         ("lora_alpha", None), ("rank_pattern", {"q_proj": "x"}),
                                         ("use_rslora", "false")])
def test_bad_numbers_name_their_key(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"{field}"):
        import_peft(_adapter(tmp_path, **{field: value}))


def test_targeted_module_without_weights_is_named(tmp_path, tiny):
    directory = _adapter(tmp_path, drop=LAYER0_Q_KEYS)
    with pytest.raises(ValueError, match=f"no lora_A / lora_B for {LAYER0_Q}, which target_modules"):
        load_any_adapter(directory, tiny[1], MODEL_DIR)


def test_excluded_module_with_weights_is_refused_or_dropped_as_peft_does(tmp_path, tiny):
    directory = _adapter(tmp_path, exclude_modules=["encoder.layers.0.self_attn.q_proj"])
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight: exclude_modules .* PEFT would not apply"):
        import_peft(directory)
    (adapter, config), messages = _quiet(import_peft, directory, trust_weights=True, base_params=tiny[1])
    assert any("dropping those weights, as PEFT does" in m for m in messages), messages
    assert "q_proj" not in adapter["model"]["encoder"]["layers"]["0"]["self_attn"]
    assert not config.is_target(LAYER0_Q) and config.is_target("model/encoder/layers/1/self_attn/q_proj")


def test_excluded_module_without_weights_is_left_alone(tmp_path, tiny):
    directory = _adapter(tmp_path, drop=LAYER0_Q_KEYS, exclude_modules=r"model\.encoder\.layers\.0\.self_attn\.q_proj")
    (adapter, config), _ = _quiet(load_any_adapter, directory, tiny[1], MODEL_DIR)
    assert not config.is_target(LAYER0_Q) and config.is_target("model/decoder/layers/0/self_attn/q_proj")
    params = lora_jax.init_lora(tiny[1], config, jax.random.PRNGKey(0))
    assert "lora_a" not in params["model"]["encoder"]["layers"]["0"]["self_attn"]["q_proj"]


LAYER1_KEYS = tuple(f"base_model.model.model.{side}.layers.1.{attn}.{proj}.lora_{ab}.weight"
                    for side, attn in (("encoder", "self_attn"), ("decoder", "self_attn"), ("decoder", "encoder_attn"))
                    for proj in ("q_proj", "v_proj") for ab in "AB")


@pytest.mark.parametrize("pattern", [None, "layers", ["h", "layers"]])
def test_layers_to_transform_selects_layers_as_peft_does(tmp_path, tiny, pattern):
    with pytest.raises(ValueError, match=r"layers\.1\..*lora_A\.weight: layers_to_transform in adapter_config.json"):
        import_peft(_adapter(tmp_path, layers_to_transform=[0], layers_pattern=pattern))
    shutil.rmtree(tmp_path / "adapter")
    directory = _adapter(tmp_path, drop=LAYER1_KEYS, layers_to_transform=0, layers_pattern=pattern)
    (adapter, config), messages = _quiet(load_any_adapter, directory, tiny[1], MODEL_DIR)  # no layer-1 weights needed
    assert not messages and config.is_target(LAYER0_Q) and not config.is_target("model/encoder/layers/1/self_attn/q_proj")


def test_layers_to_transform_with_regex_targets_is_refused_as_in_peft(tmp_path):
    with pytest.raises(ValueError, match="layers_to_transform cannot be used with a regex target_modules"):
        import_peft(_adapter(tmp_path, target_modules=".*q_proj", layers_to_transform=[0]))


def test_null_target_modules_are_peft_defaults_for_bart(tmp_path):
    _, config = import_peft(_adapter(tmp_path, target_modules=None))
    assert set(config.targets) == {"q_proj", "v_proj"}


def test_exported_peft_adapter_warns_on_other_base_weights(tmp_path, tiny):
    model, base = tiny
    adapter, config = import_peft(PEFT_DIR)
    export_peft(str(tmp_path / "peft"), lora_jax.combine(base, adapter), config, "my-base")
    assert json.load(open(tmp_path / "peft" / BASE_NAME))["base_model"] == "my-base"
    _, messages = _quiet(load_any_adapter, str(tmp_path / "peft"), base, "another-name")
    assert not messages  # the fingerprint matches: the name alone is no reason to warn
    other = dict(base)
    other["final_logits_bias"] = np.asarray(base["final_logits_bias"]) + 1.0  # same shape, other weights
    _, messages = _quiet(load_any_adapter, str(tmp_path / "peft"), other, "my-base")
    assert any("whose weights differ from the base given here" in m for m in messages), messages


def test_peft_made_adapter_compares_the_base_name(tmp_path, tiny):
    _, messages = _quiet(load_any_adapter, PEFT_DIR, tiny[1], "/somewhere/model")  # fixture names "../model"
    assert not messages
    _, messages = _quiet(load_any_adapter, PEFT_DIR, tiny[1], "facebook/bart-large")
    assert any("names base_model_name_or_path '../model', but the base given is 'facebook/bart-large'" in m
               for m in messages), messages


def test_damaged_fingerprint_file_warns_and_loads(tmp_path, tiny):
    adapter, config = import_peft(PEFT_DIR)
    export_peft(str(tmp_path / "peft"), lora_jax.combine(tiny[1], adapter), config, MODEL_DIR)
    (tmp_path / "peft" / BASE_NAME).write_text("{not json")
    (loaded, _), messages = _quiet(load_any_adapter, str(tmp_path / "peft"), tiny[1], MODEL_DIR)
    assert any(f"{BASE_NAME} is damaged" in m and "base not verified" in m for m in messages), messages


def test_library_exports_never_mix_peft_and_merged_files(tmp_path, tiny):
    from lora_jax.checkpoints.merged import export_merged

    model, base = tiny
    adapter, config = import_peft(PEFT_DIR)
    params = lora_jax.combine(base, adapter)
    export_peft(str(tmp_path / "p"), params, config, MODEL_DIR)
    with pytest.raises(FileExistsError, match="already holds a PEFT adapter .*adapter_config.json"):
        export_merged(str(tmp_path / "p"), params, config, model.config)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileExistsError, match="already holds a model checkpoint"):
        export_peft(str(tmp_path / "m"), params, config, MODEL_DIR)
    assert sorted(os.listdir(tmp_path / "m")) == ["model.safetensors"]
