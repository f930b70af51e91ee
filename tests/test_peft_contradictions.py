"""A PEFT adapter_config.json that contradicts its weights is refused naming the key (or, with trust_weights=True,
the weights win with a warning); an old torch-pickled adapter without torch says how to proceed."""

import builtins
import json
import os
import shutil

import chex
import pytest
from safetensors.numpy import load_file

import lora_jax
from lora_jax.checkpoints.peft import export_peft, import_peft
from tests.conftest import PEFT_DIR

Q_KEY = r"base_model\.model\.model\.(en|de)coder\.layers\.\d\.(self_attn|encoder_attn)\.(q|v)_proj\.lora_A\.weight"


def _adapter(tmp_path, **changes):
    """A copy of the tiny-bart PEFT fixture (r=4, alpha 8, q_proj + v_proj) with adapter_config.json fields changed."""
    out = tmp_path / "adapter"
    shutil.copytree(PEFT_DIR, out)
    cfg = json.load(open(out / "adapter_config.json"))
    cfg.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return str(out)


def test_rank_contradicting_the_weights_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=Q_KEY + r": the weights have rank 4, but adapter_config.json gives .* r=8"):
        import_peft(_adapter(tmp_path, r=8))


def test_rank_pattern_contradicting_the_weights_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"decoder\.layers\.0\.encoder_attn\.q_proj\.lora_A\.weight: the weights have rank 4"):
        import_peft(_adapter(tmp_path, rank_pattern={"decoder.layers.0.encoder_attn.q_proj": 2}))


def test_trusting_the_weights_warns_and_uses_their_rank(tmp_path):
    with pytest.warns(UserWarning, match="using ranks and targets from the weights.*r=8"):
        adapter, config = import_peft(_adapter(tmp_path, r=8), trust_weights=True)
    expected, expected_config = import_peft(PEFT_DIR)
    chex.assert_trees_all_equal(adapter, expected)
    assert config.rank == 4 and config.scale_for("model/encoder/layers/0/self_attn/q_proj") == 2.0


def test_targets_missing_an_adapted_module_name_its_key(tmp_path):
    with pytest.raises(ValueError, match=r"v_proj\.lora_A\.weight: the weights adapt .*v_proj, which target_modules \['q_proj'\]"):
        import_peft(_adapter(tmp_path, target_modules=["q_proj"]))


def test_target_without_weights_is_named(tmp_path):
    with pytest.raises(ValueError, match="target_modules entry 'k_proj' .* matches no adapter weight"):
        import_peft(_adapter(tmp_path, target_modules=["q_proj", "k_proj", "v_proj"]))


def test_trusted_targets_make_truthful_metadata(tmp_path):
    with pytest.warns(UserWarning, match="k_proj"):
        adapter, config = import_peft(_adapter(tmp_path, target_modules=["q_proj", "k_proj", "v_proj"]), trust_weights=True)
    export_peft(str(tmp_path / "again"), adapter, config, "base")
    _, back = import_peft(str(tmp_path / "again"))  # no contradiction left
    assert not back.is_target("model/encoder/layers/0/self_attn/k_proj")
    assert back.is_target("model/encoder/layers/0/self_attn/q_proj")


def test_modules_to_save_without_weights_is_named(tmp_path):
    with pytest.raises(ValueError, match="modules_to_save entry 'lm_head' .* has no weights"):
        import_peft(_adapter(tmp_path, modules_to_save=["lm_head"]))


def test_all_linear_takes_targets_from_the_weights(tmp_path):
    _, config = import_peft(_adapter(tmp_path, target_modules="all-linear"))
    assert config.is_target("model/decoder/layers/1/encoder_attn/v_proj")
    assert not config.is_target("model/decoder/layers/1/fc1")


def test_bin_adapter_without_torch_says_how_to_proceed(tmp_path, monkeypatch):
    d = tmp_path / "adapter"
    shutil.copytree(PEFT_DIR, d)
    os.rename(d / "adapter_model.safetensors", d / "adapter_model.bin")
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(ImportError, match=r"adapter_model\.bin is a torch pickle.*pip install 'lora_jax\[torch\]'.*safetensors"):
        import_peft(str(d))


def test_the_fixture_itself_is_consistent():
    adapter, config = import_peft(PEFT_DIR)
    assert config.rank == 4 and set(config.targets) == {"q_proj", "v_proj"}
    assert len(load_file(os.path.join(PEFT_DIR, "adapter_model.safetensors"))) == len(lora_jax.tree.flatten_tree(adapter))
