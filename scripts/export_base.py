"""Copies the model trained by configs/demo_pretrain.yaml into data/demo_base, the demo's pretrained base.

Only `model.safetensors` (PyTorch layout, float32), `config.json`, `generation_config.json` and the tokenizer files are
kept, to stay small (lora_jax.load_pretrained and transformers both read it).

    python -m scripts.export_base runs/demo_pretrain/model data/demo_base
"""

import json
import os
import sys

import lora_jax

GENERATION = {"decoder_start_token_id": 2, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "forced_eos_token_id": 2}


def main(src: str, dst: str) -> None:
    model, params = lora_jax.load_pretrained(src)
    lora_jax.save_pretrained(dst, params, model.config, tokenizer_dir=src, generation_config=GENERATION, flax=False)
    size = sum(os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst))
    print(json.dumps({"from": src, "to": dst, "bytes": size}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
