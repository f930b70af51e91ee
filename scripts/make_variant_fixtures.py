"""Makes tests/fixtures/tiny-bart/variants/: PEFT references for DoRA, PiSSA and OLoRA on the tiny fixture model.

    pip install torch==2.13.0 peft==0.21.2   # the optional extra: pip install -e '.[torch]'
    python -m scripts.make_variant_fixtures

Writes (about 0.8 MB in all):
- peft_dora/: a PEFT DoRA adapter (r=4, alpha=8, q_proj and v_proj, `init_lora_weights=False` so A and B are
  non-zero; the magnitude vectors are then scaled by random factors in [0.8, 1.2] so they differ from the column norms).
- reference.npz: `dora_logits` (unmerged) and `dora_merged_logits` (after merge_and_unload) on reference.npz's inputs;
  for PEFT's "pissa" and "olora" initialisations (r=4, alpha=8, q_proj and v_proj) of the module
  model.encoder.layers.0.self_attn.q_proj: `<init>_lora_A` (r, in), `<init>_lora_B` (out, r) and `<init>_residual`
  (the base weight after initialisation, (out, in)).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import BartForConditionalGeneration

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "tiny-bart")
OUT = os.path.join(ROOT, "variants")
MODULE = "model.encoder.layers.0.self_attn.q_proj"


def logits(model, ref) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ref["input_ids"]), attention_mask=torch.tensor(ref["attention_mask"]),
                    decoder_input_ids=torch.tensor(ref["decoder_input_ids"]))
    return out.logits.numpy().astype(np.float32)


def base_model():
    model = BartForConditionalGeneration.from_pretrained(os.path.join(ROOT, "model"))
    return model.eval()


def make_dora(ref) -> dict:
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False)
    model = get_peft_model(base_model(), config).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_magnitude_vector:
                weight = module.lora_magnitude_vector["default"].weight
                weight.mul_(0.8 + 0.4 * torch.rand_like(weight))
    model.save_pretrained(os.path.join(OUT, "peft_dora"))
    os.remove(os.path.join(OUT, "peft_dora", "README.md"))  # PEFT's generic model card
    unmerged = logits(model, ref)
    merged = logits(model.merge_and_unload(), ref)
    return {"dora_logits": unmerged, "dora_merged_logits": merged}


def make_init(ref, init: str) -> dict:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    model = get_peft_model(base_model(), config).eval()
    layer = model.get_submodule("base_model.model." + MODULE)
    return {f"{init}_lora_A": layer.lora_A["default"].weight.detach().numpy().copy(),
            f"{init}_lora_B": layer.lora_B["default"].weight.detach().numpy().copy(),
            f"{init}_residual": layer.base_layer.weight.detach().numpy().copy()}


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    ref = dict(np.load(os.path.join(ROOT, "reference.npz")))
    arrays = make_dora(ref)
    for init in ("pissa", "olora"):
        arrays.update(make_init(ref, init))
    np.savez_compressed(os.path.join(OUT, "reference.npz"), **arrays)
    print({k: v.shape for k, v in arrays.items()})


if __name__ == "__main__":
    main()
