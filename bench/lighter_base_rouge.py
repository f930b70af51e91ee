"""ROUGE of one trained adapter served over a lighter frozen base: the same adapter on the float32 base, a bfloat16
copy, int8 kernels, and int8 kernels + int8 token embeddings / tied head (the bench's `jax_generate_int8` base),
with the run config's generation settings. Tells what the lighter base costs in quality (issue 25: int8-base
generation within 0.5 ROUGE-L of the float32 base's). Prints one JSON line per base and a markdown table.

    python -m train --config configs/demo.yaml                    # trains runs/demo/adapter
    python -m bench.lighter_base_rouge --config configs/demo.yaml --adapter runs/demo/adapter [--split eval]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp

import lora_jax
from lora_jax.quantization import QuantSpec, quantize_base, storage_bytes
from lora_jax.lora.transform import split_trainable
from train.build import build
from train.config import load_config
from train.evaluate import score

BASES = {
    "float32": lambda base: base,
    "bfloat16": lambda base: jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), base),
    "int8 kernels": lambda base: quantize_base(base, QuantSpec("int8")),
    "int8 kernels + embeddings": lambda base: quantize_base(base, QuantSpec("int8", embeddings=True)),
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--adapter", required=True, help="a trained adapter directory (lora_jax or PEFT)")
    ap.add_argument("--split", default="eval", choices=["eval", "test"])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set)
    run = build(cfg, for_training=False, adapter_dir=args.adapter)
    adapter, base = split_trainable(run.params, run.lora_config)  # modules_to_save stay with the adapter, unquantised
    rows = []
    for name, lighten in BASES.items():
        light = lighten(base)
        start = time.perf_counter()
        scores, *_ = score(run.apply_model, lora_jax.combine(light, adapter), run.tokenizer, run.splits[args.split],
                           run.cfg, run.gen, run.pad_id, run.start_id)
        rows.append({"base": name, "base_bytes": storage_bytes(light), "split": args.split,
                     "seconds": time.perf_counter() - start, **scores})
        print(json.dumps(rows[-1]), flush=True)
    ref = rows[0]["rougeL"]
    print("\n| frozen base | base MB | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-L − float32's |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['base']} | {r['base_bytes'] / 1e6:.1f} | {r['rouge1']:.2f} | {r['rouge2']:.2f} | {r['rougeL']:.2f} "
              f"| {r['rougeL'] - ref:+.2f} |")


if __name__ == "__main__":
    sys.exit(main())
