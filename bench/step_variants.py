"""The LoRA train step's dropout and remat choices, one change at a time, timed round-robin in one process.

Same model, weights, batch and LoRA setting as `bench.run`'s jax_lora row (bart-base size by default, r=8 on q,v,
dropout 0.1 everywhere). Each variant is the previous one plus one change:

  bernoulli_redrawn  linen's masks (`jax.random.bernoulli`: one Philox block per element), which 'dots' remat draws
                     again in the backward pass (the code before issue 25's dropout change)
  halfword_redrawn   + `lora_jax.dropout` masks: one 32-bit word per two elements (16-bit thresholds)
  halfword_kept      + the 'dots' policy keeps the masks (1 byte per element) instead of drawing them again (default)
  no_remat           the same masks without rematerialisation (more activation memory)
  no_dropout         dropout off: the floor, what all the dropout work costs together

Prints one JSON line per variant (median step s, ratio to the first, XLA's temporary bytes) and a markdown table.

    python -m bench.step_variants [--model base --batch 4 --source-len 256 --target-len 64 --repeats 7]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import optax

import lora_jax
import lora_jax.dropout as dropout_module
from bench.common import BenchSpec, add_shape_arguments, interleaved_median_times, shape_spec
from bench.jax_bench import build_model, device_batch, lora_config
from lora_jax.models import layer_stack

VARIANTS = ("bernoulli_redrawn", "halfword_redrawn", "halfword_kept", "no_remat", "no_dropout")


def _bernoulli_mask(key, shape, rate):
    return jax.random.bernoulli(key, 1.0 - rate, shape)


@contextlib.contextmanager
def variant_code(name: str):
    """The library as it computes `name` (only while the step is traced and compiled)."""
    with contextlib.ExitStack() as stack:
        if name == "bernoulli_redrawn":
            stack.enter_context(mock.patch.object(dropout_module, "keep_mask", _bernoulli_mask))
        if name in ("bernoulli_redrawn", "halfword_redrawn"):
            policies = {**layer_stack.REMAT_POLICIES, "dots": jax.checkpoint_policies.dots_saveable}
            stack.enter_context(mock.patch.dict(layer_stack.REMAT_POLICIES, policies))
        yield


def build_step(spec: BenchSpec, name: str, model, params, batch, rng):
    """(a zero-argument function running one step to completion and returning its loss, XLA's temporary bytes of the
    compiled step)."""
    remat = None if name == "no_remat" else spec.remat
    model = model.clone(remat=remat, scan_layers=spec.scan_layers)
    lora = lora_config(spec)
    if name == "no_dropout":  # the same step with every rate at 0 (attention, activation, residual and adapter)
        off = dataclasses.replace(model.config, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
        model = model.clone(config=off)
        lora = dataclasses.replace(lora, dropout=0.0)
    tx = lora_jax.lora_optimizer(optax.adamw(spec.learning_rate, weight_decay=0.0), lora)
    state = lora_jax.create_train_state(params, lora, tx, stack_layers=spec.scan_layers)
    step = lora_jax.make_train_step(model, lora, jit=False)
    with variant_code(name):
        compiled = jax.jit(step).lower(state, batch, rng).compile()
    memory = compiled.memory_analysis()
    temp = getattr(memory, "temp_size_in_bytes", None)
    holder = {"state": state}

    def run() -> jax.Array:
        holder["state"], metrics = compiled(holder["state"], batch, rng)
        jax.block_until_ready((holder["state"].trainable, metrics["loss"]))
        return metrics["loss"]

    return run, temp


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(ap)
    ap.add_argument("--repeats", type=int, default=7, help="timed steps per variant (round-robin, median reported)")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    args = ap.parse_args(argv)
    spec = shape_spec(args)
    model, base = build_model(spec)
    params = lora_jax.init_lora(base, lora_config(spec), jax.random.PRNGKey(spec.seed + 1))
    batch, rng = device_batch(spec), jax.random.PRNGKey(spec.seed + 2)
    runs, temps = {}, {}
    for name in args.variants:
        runs[name], temps[name] = build_step(spec, name, model, params, batch, rng)
        runs[name]()  # warm-up: first-call allocations out of the timing
    times = interleaved_median_times(runs, args.repeats)
    first = times[args.variants[0]]
    lines = ["| variant | step s (median) | ÷ " + args.variants[0] + " | XLA temporaries MiB |", "|---|---|---|---|"]
    for name in args.variants:
        record = {"variant": name, "step_s": times[name], "ratio": times[name] / first, "temp_bytes": temps[name],
                  "model": args.model, "batch": args.batch, "source_len": args.source_len,
                  "target_len": args.target_len, "repeats": args.repeats, "remat": spec.remat}
        print(json.dumps(record), flush=True)
        temp = "—" if temps[name] is None else f"{temps[name] / 2**20:,.0f}"
        lines.append(f"| {name} | {times[name]:.3f} | {times[name] / first:.3f} | {temp} |")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
