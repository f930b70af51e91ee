"""Time of `base_fingerprint` (the adapter's check of its frozen base) on a bart-large-sized tree. Prints one JSON line.

    python -m bench.fingerprint [--d-model 1024 --layers 12 --ffn 4096 --vocab 50265]

The weights are random (numpy, float32); the first call includes compiling the per-shape checksum.
"""

import argparse
import json
import time

import jax
import numpy as np

import lora_jax
from lora_jax.checkpoints.adapter import base_fingerprint
from lora_jax.checkpoints.hf import expected_shapes
from lora_jax.tree import unflatten_tree


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.fingerprint")
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=50265)
    args = ap.parse_args(argv)
    config = lora_jax.BartConfig(vocab_size=args.vocab, d_model=args.d_model, encoder_layers=args.layers,
                                 decoder_layers=args.layers, encoder_ffn_dim=args.ffn, decoder_ffn_dim=args.ffn,
                                 encoder_attention_heads=16, decoder_attention_heads=16)
    rng = np.random.default_rng(0)
    host = unflatten_tree({p: rng.standard_normal(s, np.float32) for p, s in expected_shapes(config).items()})
    params = jax.device_put(host)
    jax.block_until_ready(params)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        base_fingerprint(params)
        times.append(time.perf_counter() - start)
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    print(json.dumps({"params": count, "first_call_s": round(times[0], 3), "later_calls_s": [round(t, 3) for t in times[1:]],
                      "devices": jax.device_count(), "backend": jax.default_backend()}))


if __name__ == "__main__":
    main()
