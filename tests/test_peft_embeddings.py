"""PEFT adapters that touch the embeddings or the head, made by PEFT 0.21 (tests/fixtures/interop): modules_to_save on
lm_head / embed_tokens and LoRA on embed_tokens reproduce PEFT's logits unmerged and merged and re-export identically;
what PEFT cannot express is refused, naming the module."""

import json
import os
import shutil

import chex
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lora_jax
from lora_jax import LoraConfig, LoraModel
from lora_jax.checkpoints.adapter import load_adapter, save_adapter
from lora_jax.checkpoints.peft import export_peft, import_peft
from lora_jax.tree import flatten_tree, unflatten_tree
from tests.test_untied import INTEROP, _logits, iref  # noqa: F401 (iref is a fixture)

# adapter -> the base it was made on
ADAPTERS = {"peft_lm_head": "tied", "peft_embed_tokens": "tied", "peft_lora_embedding": "untied",
            "peft_untied_lm_head": "untied"}


@pytest.fixture(scope="module", params=sorted(ADAPTERS))
def adapted(request):
    """(name, model, base params, adapter, LoraConfig) for each fixture adapter."""
    name = request.param
    model, base = lora_jax.load_pretrained(os.path.join(INTEROP, ADAPTERS[name]))
    adapter, config = import_peft(os.path.join(INTEROP, name))
    return name, model, base, adapter, config


@pytest.mark.parametrize("jit", [True, False])
def test_reproduces_peft_unmerged_and_merged(adapted, iref, jit):
    name, model, base, adapter, config = adapted
    params = lora_jax.combine(base, adapter)
    chex.assert_trees_all_close(_logits(LoraModel(model, config), params, iref, jit), iref[f"{name}_logits"], atol=1e-4, rtol=0)
    merged = lora_jax.merge_lora(params, config)
    chex.assert_trees_all_close(_logits(model, merged, iref, jit), iref[f"{name}_merged_logits"], atol=1e-4, rtol=0)


def test_generation_matches_peft(adapted, iref):
    name, model, base, adapter, config = adapted
    ids = lora_jax.generate(LoraModel(model, config), lora_jax.combine(base, adapter), iref["input_ids"],
                            iref["attention_mask"], num_beams=3, max_new_tokens=8, length_penalty=1.0, early_stopping=True)
    np.testing.assert_array_equal(np.asarray(ids)[:, : iref[f"{name}_beam3"].shape[1]], iref[f"{name}_beam3"])


def test_reexport_is_identical(tmp_path, adapted):
    name, _, base, adapter, config = adapted
    export_peft(str(tmp_path), lora_jax.combine(base, adapter), config, "base")
    ours, theirs = load_file(str(tmp_path / "adapter_model.safetensors")), load_file(os.path.join(INTEROP, name, "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)
    mine, fixture = (json.load(open(os.path.join(d, "adapter_config.json"))) for d in (tmp_path, os.path.join(INTEROP, name)))
    for key in ("r", "lora_alpha", "modules_to_save", "use_rslora", "rank_pattern", "alpha_pattern"):
        assert mine[key] == fixture[key], key
    assert set(mine["target_modules"]) == set(fixture["target_modules"])


def test_merged_export_reloads_untied_with_peft_merged_logits(tmp_path, adapted, iref):
    name, model, base, adapter, config = adapted
    lora_jax.export_merged(str(tmp_path), lora_jax.combine(base, adapter), config, model.config)
    back_model, back = lora_jax.load_pretrained(str(tmp_path))
    assert back_model.config.tie_word_embeddings is False  # the head or token embeddings are no longer the shared one
    chex.assert_trees_all_close(_logits(back_model, back, iref), iref[f"{name}_merged_logits"], atol=1e-4, rtol=0)


def test_lora_jax_adapter_round_trip_on_a_tied_base(tmp_path, adapted, iref):
    name, model, base, adapter, config = adapted
    save_adapter(str(tmp_path / "a"), lora_jax.combine(base, adapter), config, base_params=base)
    loaded, back_config, _ = load_adapter(str(tmp_path / "a"), base_params=base)  # shape check accepts lm_head on a tied base
    chex.assert_trees_all_close(_logits(LoraModel(model, back_config), lora_jax.combine(base, loaded), iref),
                                iref[f"{name}_logits"], atol=1e-4, rtol=0)


def _rewritten(tmp_path, name, rename=None, **config_changes):
    """A copy of fixture adapter `name` with keys renamed {old substring: new} and adapter_config.json fields changed."""
    out = tmp_path / name
    shutil.copytree(os.path.join(INTEROP, name), out)
    state = load_file(str(out / "adapter_model.safetensors"))
    for old, new in (rename or {}).items():
        state = {k.replace(old, new): v for k, v in state.items()}
    save_file(state, str(out / "adapter_model.safetensors"))
    cfg = json.load(open(out / "adapter_config.json"))
    cfg.update(config_changes)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return str(out)


def test_modules_to_save_shared_is_refused(tmp_path):
    d = _rewritten(tmp_path, "peft_embed_tokens", {"model.encoder.embed_tokens": "model.shared"}, modules_to_save=["shared"])
    with pytest.raises(ValueError, match=r"base_model\.model\.model\.shared\.weight.*never calls"):
        import_peft(d)


def _with_random_b(tree):
    """B = 0 after init; a random B (a constant one would vanish in layernorm_embedding) makes the adapter act."""
    flat = flatten_tree(tree)
    rng = np.random.default_rng(0)
    return unflatten_tree({p: rng.normal(0, 0.3, np.shape(v)).astype(np.float32) if p[-1] == "lora_b" else v for p, v in flat.items()})


def test_lora_on_tied_embed_tokens_needs_an_untied_base(tiny, ref):
    model, base = tiny
    config = LoraConfig(rank=2, alpha=4, targets=("embed_tokens",))
    untied = lora_jax.untie_embeddings(base)
    adapter = _with_random_b(lora_jax.adapter_params(lora_jax.init_lora(untied, config, jax.random.PRNGKey(0)), config))
    with pytest.raises(ValueError, match="model/encoder/embed_tokens.*untie_embeddings"):
        _logits(LoraModel(model, config), lora_jax.combine(base, adapter), ref)
    unmerged = _logits(LoraModel(model, config), lora_jax.combine(untied, adapter), ref)
    merged = _logits(model, lora_jax.merge_lora(lora_jax.combine(untied, adapter), config), ref)
    chex.assert_trees_all_close(unmerged, merged, atol=1e-4, rtol=0)
    assert np.abs(unmerged - _logits(model, untied, ref)).max() > 1e-2  # the adapter does something


def test_lora_on_the_tied_shared_embedding_adapts_lookup_and_head_alike(tmp_path, tiny, ref):
    model, base = tiny
    config = LoraConfig(rank=2, alpha=4, targets=("shared",))
    params = lora_jax.combine(base, _with_random_b(lora_jax.init_lora(base, config, jax.random.PRNGKey(0))))
    unmerged = _logits(LoraModel(model, config), params, ref)
    chex.assert_trees_all_close(unmerged, _logits(model, lora_jax.merge_lora(params, config), ref), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="model/shared/lora_a.*never calls"):
        export_peft(str(tmp_path), params, config, "base")


def test_a_head_of_the_wrong_shape_does_not_fit_a_tied_base(tiny):
    from lora_jax.checkpoints.adapter import AdapterMismatchError, check_adapter_fits

    check_adapter_fits({"lm_head": {"kernel": np.zeros((32, 1000), np.float32)}}, tiny[1])  # (D, V): fits
    with pytest.raises(AdapterMismatchError, match="lm_head/kernel: no such leaf in the base"):
        check_adapter_fits({"lm_head": {"kernel": np.zeros((1000, 32), np.float32)}}, tiny[1])
