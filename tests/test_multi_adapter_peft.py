"""Mixed-adapter batches against PEFT's own `adapter_names=` (forward logits, greedy and 4-beam generate).

The reference outputs were made by PEFT 0.21 + transformers 4.57 (`scripts/make_multi_adapter_fixture.py`) and are
compared without torch; with torch, PEFT and transformers 4.x installed, PEFT is also run live."""

import os

import chex
import numpy as np
import pytest

import lora_jax
from lora_jax.checkpoints.peft import import_peft
from lora_jax.generation import load_generation_config
from lora_jax.lora.multi import MultiLoraModel
from lora_jax.lora.stack import stack_adapters
from scripts.make_multi_adapter_fixture import GENERATE, OUT, ROW_ADAPTERS, peft_mixed_outputs
from tests.conftest import MODEL_DIR, PEFT_DIR

DIRS = {"a": PEFT_DIR, "b": os.path.join(OUT, "adapter_b")}


@pytest.fixture(scope="module")
def peft_ref():
    return dict(np.load(os.path.join(OUT, "reference.npz")))


@pytest.fixture(scope="module")
def multi(tiny):
    model, base = tiny
    loaded = {name: import_peft(d) for name, d in DIRS.items()}
    stacked, info = stack_adapters({n: a for n, (a, _) in loaded.items()}, {n: c for n, (_, c) in loaded.items()})
    ids = info.ids([None if n == "__base__" else n for n in ROW_ADAPTERS])
    return MultiLoraModel(model, info), lora_jax.combine(base, stacked), ids


def test_mixed_forward_matches_peft_adapter_names(multi, batch, peft_ref):
    model, params, ids = multi
    logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"],
                         adapter_ids=ids)
    chex.assert_trees_all_close(logits, peft_ref["logits"], atol=1e-4, rtol=0)  # the PEFT fixture tests' tolerance


@pytest.mark.parametrize("num_beams", [1, 4])
def test_mixed_generate_matches_peft_adapter_names(multi, batch, peft_ref, num_beams):
    model, params, ids = multi
    out = lora_jax.generate(model, params, batch["input_ids"], batch["attention_mask"], adapter_ids=ids,
                            num_beams=num_beams, generation_config=load_generation_config(MODEL_DIR), **GENERATE)
    np.testing.assert_array_equal(out, peft_ref[f"beam{num_beams}_ids"])


def test_live_peft_forward_when_installed(ref, peft_ref):
    pytest.importorskip("torch", reason="optional: pip install 'lora_jax[torch]' to check against PEFT itself")
    pytest.importorskip("peft", reason="optional: pip install 'lora_jax[torch]' to check against PEFT itself")
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip("PEFT 0.21's seq2seq PeftModel needs transformers 4.x (the fixture was made with 4.57.6)")
    live = peft_mixed_outputs(DIRS, ref)
    np.testing.assert_allclose(live["logits"], peft_ref["logits"], atol=1e-5)
    for key in ("beam1_ids", "beam4_ids"):
        np.testing.assert_array_equal(live[key], peft_ref[key])
