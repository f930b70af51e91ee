"""Makes tests/fixtures/interop/: small BARTs and PEFT adapters made by transformers + PEFT, with their logits.

Needs torch, transformers and peft (`pip install -e '.[torch]'`); the tests read only the files it writes.

    python -m scripts.make_interop_fixtures tests/fixtures/interop

Written (all random weights, vocab 64, d_model 16, 1+1 layers, a few hundred KB in all):
    untied/        a BART saved with tie_word_embeddings=False: four separate embedding/head weights
    tied/          the same architecture, tied (the base of the adapters below)
    peft_lm_head/  LoRA r=4 on q,v + modules_to_save=["lm_head"], on tied/
    peft_embed_tokens/  LoRA r=4 on q,v + modules_to_save=["embed_tokens"], on tied/
    peft_lora_embedding/  LoRA r=4 on embed_tokens (lora_embedding_A/B) and fc1, on untied/
    peft_untied_lm_head/  LoRA r=4 on q,v + modules_to_save=["lm_head"], on untied/
    reference.npz  inputs and, per model or adapter, logits (unmerged and after merge_and_unload) and generations
Each saved module copy and LoRA weight is made non-trivial (random), as after training.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

ARCH = dict(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, forced_eos_token_id=None, init_std=0.3)
ADAPTERS = {
    "peft_lm_head": ("tied", dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])),
    "peft_embed_tokens": ("tied", dict(target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens"])),
    "peft_lora_embedding": ("untied", dict(target_modules=["embed_tokens", "fc1"])),
    "peft_untied_lm_head": ("untied", dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])),
}


def make_base(out: str, tied: bool, seed: int) -> transformers.BartForConditionalGeneration:
    torch.manual_seed(seed)
    config = transformers.BartConfig(**ARCH, tie_word_embeddings=tied)
    model = transformers.BartForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_(0, 0.5)  # a non-zero bias, so a bias bug shows
    model.save_pretrained(out)
    return transformers.BartForConditionalGeneration.from_pretrained(out).eval()


def inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, ARCH["vocab_size"], (2, 7), generator=g)
    ids[:, 0], ids[1, 5:] = 0, 1
    mask = (ids != 1).long()
    dec = torch.randint(3, ARCH["vocab_size"], (2, 5), generator=g)
    dec[:, 0] = 2
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}


@torch.no_grad()
def logits(model, batch) -> np.ndarray:
    return model(**batch).logits.float().numpy()


@torch.no_grad()
def generations(model, batch, name: str) -> dict[str, np.ndarray]:
    common = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=8,
                  no_repeat_ngram_size=0, forced_bos_token_id=None, forced_eos_token_id=None, min_length=0)
    greedy = model.generate(**common, num_beams=1, do_sample=False)
    beam = model.generate(**common, num_beams=3, do_sample=False, length_penalty=1.0, early_stopping=True)
    return {f"{name}_greedy": greedy.numpy(), f"{name}_beam3": beam.numpy()}


@torch.no_grad()
def make_adapter(out: str, base_dir: str, settings: dict, seed: int):
    torch.manual_seed(seed)
    model = transformers.BartForConditionalGeneration.from_pretrained(base_dir).eval()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **settings)).eval()
    for name, param in peft_model.named_parameters():
        if "modules_to_save" in name or "lora_embedding" in name:
            param.add_(torch.randn_like(param) * 0.5)  # as if trained
    peft_model.save_pretrained(out)
    os.remove(os.path.join(out, "README.md"))  # PEFT's model-card template, not needed
    return PeftModel.from_pretrained(transformers.BartForConditionalGeneration.from_pretrained(base_dir), out).eval()


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    batch = inputs()
    ref = {k: v.numpy() for k, v in batch.items()}
    for name, tied, seed in (("untied", False, 1), ("tied", True, 2)):
        model = make_base(os.path.join(out, name), tied, seed)
        ref[f"{name}_logits"] = logits(model, batch)
        ref.update(generations(model, batch, name))
    for name, (base, settings) in ADAPTERS.items():
        peft_model = make_adapter(os.path.join(out, name), os.path.join(out, base), settings, seed=len(name))
        ref[f"{name}_logits"] = logits(peft_model, batch)
        ref.update(generations(peft_model, batch, name))
        ref[f"{name}_merged_logits"] = logits(peft_model.merge_and_unload(), batch)
    np.savez_compressed(os.path.join(out, "reference.npz"), **ref)
    print(f"wrote {out}: " + ", ".join(sorted(ref)))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/interop")
