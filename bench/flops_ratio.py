"""XLA's FLOP count of the compiled LoRA train step vs the full fine-tuning step (evidence that frozen kernels get no
gradient). Compiles only; runs nothing. Prints one JSON line.

    python -m bench.flops_ratio [--batch 4 --source-len 256 --target-len 64 --rank 8]
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax


def step_flops(model, lora_config, batch) -> float:
    full = lora_config is None
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])["params"]
    )
    if not full:
        shapes = jax.eval_shape(lambda p: lora_jax.init_lora(p, lora_config, jax.random.PRNGKey(0)), shapes)
    tx = lora_jax.lora_optimizer(optax.adamw(1e-4), lora_config, full_finetune=full)
    state = jax.eval_shape(lambda p: lora_jax.create_train_state(p, lora_config, tx, full_finetune=full), shapes)
    step = lora_jax.make_train_step(model, lora_config, jit=False)
    cost = jax.jit(step).lower(state, batch, jax.random.PRNGKey(0)).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--source-len", type=int, default=256)
    ap.add_argument("--target-len", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    model = lora_jax.BartForConditionalGeneration(lora_jax.bart_base_config())
    rng = np.random.default_rng(0)
    src = jnp.asarray(rng.integers(5, 50000, (args.batch, args.source_len)), jnp.int32)
    tgt = jnp.asarray(rng.integers(5, 50000, (args.batch, args.target_len)), jnp.int32)
    batch = {"input_ids": src, "attention_mask": jnp.ones_like(src), "decoder_input_ids": tgt, "labels": tgt}
    lora = lora_jax.LoraConfig(rank=args.rank, alpha=2 * args.rank, targets=("q_proj", "v_proj"))
    lora_flops, full_flops = step_flops(model, lora, batch), step_flops(model, None, batch)
    print(json.dumps({"model": "bart-base", **vars(args), "lora_step_flops": lora_flops, "full_step_flops": full_flops,
                      "ratio": lora_flops / full_flops}))


if __name__ == "__main__":
    main()
