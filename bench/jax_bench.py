"""The lora_jax measurements: train steps (LoRA and full fine-tuning), the matmul reference, forward latency (base,
merged, unmerged adapters), beam-search throughput and checkpoint sizes. Each `bench_*` function is one system of
the runner and returns the fields of its JSON line."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

import lora_jax
from bench.common import (
    BenchSpec, interleaved_median_times, make_batch, median_time, random_leaves, time_generate, time_train_steps,
)
from bench.bandwidth import decode_step_bytes, measure_bandwidth
from bench.memory import memory_fields, start_phase
from lora_jax.checkpoints.hf import expected_shapes
from lora_jax.generation import GenerationConfig, generate_padded
from lora_jax.models.layer_stack import unstack_layers

# JAX's compile phases (jax._src.dispatch): tracing to a jaxpr, lowering to MLIR, XLA compilation.
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


@contextlib.contextmanager
def compile_seconds():
    """Yields a list whose sum is the time JAX spent tracing, lowering and compiling inside the block."""
    spent: list[float] = []

    def listener(event: str, duration_secs: float, **_: Any) -> None:
        if event in COMPILE_EVENTS:
            spent.append(duration_secs)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield spent
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def model_config(spec: BenchSpec) -> lora_jax.BartConfig:
    return lora_jax.BartConfig(**spec.model_fields(), name_or_path=f"bench-{spec.model}")


def build_model(spec: BenchSpec):
    """(model, params): the spec's architecture with the seeded random weights, converted leaf by leaf."""
    config = model_config(spec)
    shapes = expected_shapes(config)
    flat = {path: jnp.asarray(leaf) for path, leaf in random_leaves(shapes, spec.seed, config.init_std)}
    return lora_jax.BartForConditionalGeneration(config), traverse_util.unflatten_dict(flat)


def lora_config(spec: BenchSpec) -> lora_jax.LoraConfig:
    return lora_jax.LoraConfig(rank=spec.rank, alpha=spec.alpha, targets=spec.targets, dropout=spec.lora_dropout)


def device_batch(spec: BenchSpec) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in make_batch(spec).items()}


def backend_fields() -> dict[str, Any]:
    device = jax.devices()[0]
    return {"framework": f"jax {jax.__version__}", "backend": jax.default_backend(), "device": device.device_kind}


def check_device(spec: BenchSpec) -> None:
    """A clear error when the spec asks for a GPU this process does not have."""
    if spec.device == "gpu" and jax.default_backend() != "gpu":
        raise RuntimeError(f"--device gpu, but JAX sees no GPU (backend {jax.default_backend()!r}); "
                           "install jax[cuda12] on a machine with an NVIDIA GPU, or run without --device gpu")


def device_peak_bytes() -> int | None:
    """Peak bytes allocated on the accelerator (None on CPU, where RSS is measured instead)."""
    if jax.default_backend() == "cpu":
        return None
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def step_flops(model, lora: lora_jax.LoraConfig | None, state, batch, rng) -> float | None:
    """XLA's HLO cost-analysis FLOPs of one train step. Read from the lowered (not yet optimised) program, which
    costs no second compilation; it is within ~2% of the compiled program's count (measured on small models).
    Counted on the unrolled layers: cost analysis counts a `lax.scan` body once, not once per layer."""
    step = lora_jax.make_train_step(model.clone(scan_layers=False), lora, jit=False)
    state = state.replace(frozen=jax.eval_shape(unstack_layers, state.frozen))  # abstract: no copy is made
    cost = jax.jit(step).lower(state, batch, rng).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def bench_train(spec: BenchSpec, full_finetune: bool, build=build_model) -> dict[str, Any]:
    """Median step time of `make_train_step` (AdamW, weight decay 0, dropout on) after `warmup` steps, on the
    (model, params) of `build(spec)`."""
    check_device(spec)
    model, params = build(spec)
    model = model.clone(remat=spec.remat, scan_layers=spec.scan_layers)
    if spec.device == "gpu":  # bfloat16 compute over float32 weights, as PyTorch's bf16 autocast does
        model = model.clone(dtype=jnp.bfloat16)
    lora = None if full_finetune else lora_config(spec)
    if lora is not None:
        params = lora_jax.init_lora(params, lora, jax.random.PRNGKey(spec.seed + 1))
    trainable, total, _ = lora_jax.count_params(params, lora, full_finetune=full_finetune, verbose=False)
    tx = lora_jax.lora_optimizer(optax.adamw(spec.learning_rate, weight_decay=0.0), lora, full_finetune=full_finetune)
    state = lora_jax.create_train_state(params, lora, tx, full_finetune=full_finetune,
                                        stack_layers=spec.scan_layers and not full_finetune)  # as python -m train
    del params  # the state holds what the step needs; full fine-tuning would otherwise keep a second copy
    batch, rng = device_batch(spec), jax.random.PRNGKey(spec.seed + 2)
    flops = step_flops(model, lora, state, batch, rng)
    train_step = lora_jax.make_train_step(model, lora)

    phase = start_phase()
    losses = []

    def one_step():
        nonlocal state
        state, metrics = train_step(state, batch, rng)
        jax.block_until_ready((state.trainable, state.opt_state))  # the update too, not just the loss
        losses.append(float(metrics["loss"]))

    first, median, times, steady, compiling = time_train_steps(one_step, spec.steps, spec.warmup, phase, compile_seconds())
    return {
        **backend_fields(),
        "kind": "train",
        "step_time_s": median,
        "step_times_s": times,
        "first_step_s": first,
        "compile_s": sum(compiling),
        "compilations": train_step.num_compilations(),
        "flops_per_step": flops,
        "gflops_per_s": None if flops is None else flops / median / 1e9,
        **memory_fields(phase, steady, device_peak_bytes()),
        "trainable_params": int(trainable),
        "total_params": int(total),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def bench_lora_train(spec: BenchSpec) -> dict[str, Any]:
    return {"system": "jax_lora", **bench_train(spec, full_finetune=False)}


def bench_full_train(spec: BenchSpec) -> dict[str, Any]:
    return {"system": "jax_full", **bench_train(spec, full_finetune=True)}


def bench_matmul(spec: BenchSpec) -> dict[str, Any]:
    """The machine's dense fp32 rate as JAX reaches it: a jitted n x n @ n x n matmul (2 n^3 FLOPs)."""
    n = spec.matmul_size
    kx, ky = jax.random.split(jax.random.PRNGKey(spec.seed))
    x, y = jax.random.normal(kx, (n, n), jnp.float32), jax.random.normal(ky, (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    median, times = median_time(lambda: matmul(x, y).block_until_ready(), max(spec.repeats, 10), warmup=2)
    flops = 2.0 * n**3
    return {"system": "matmul", **backend_fields(), "kind": "matmul", "size": n, "time_s": median, "times_s": times,
            "flops": flops, "gflops_per_s": flops / median / 1e9, **measure_bandwidth(max(spec.repeats, 10))}


def random_adapter(params, lora: lora_jax.LoraConfig, seed: int):
    """`init_lora` with non-zero B as well (as after training), so merged weights really differ from the base."""
    adapted = lora_jax.init_lora(params, lora, jax.random.PRNGKey(seed))
    flat = traverse_util.flatten_dict(adapted)
    for i, path in enumerate(sorted(p for p in flat if p[-1] == "lora_b")):
        flat[path] = 0.01 * jax.random.normal(jax.random.PRNGKey(seed + 1 + i), flat[path].shape, jnp.float32)
    return traverse_util.unflatten_dict(flat)


def bench_forward(spec: BenchSpec) -> dict[str, Any]:
    """Eval-mode forward latency (logits for the training batch) of the base weights, the merged weights (same
    compiled program, other values) and the unmerged adapters (`LoraModel`), timed round-robin."""
    model, params = build_model(spec)
    lora = lora_config(spec)
    adapted = random_adapter(params, lora, spec.seed + 3)
    merged = lora_jax.merge_lora(adapted, lora)
    batch = device_batch(spec)
    args = (batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
    # The batch is an argument, not a closure constant, so XLA cannot fold any of the work into the program.
    plain = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    with_adapters = lora_jax.LoraModel(model, lora)
    unmerged = jax.jit(lambda p, *a: with_adapters.apply({"params": p}, *a))
    runs = {
        "base": lambda: plain(params, *args).block_until_ready(),
        "merged": lambda: plain(merged, *args).block_until_ready(),
        "unmerged": lambda: unmerged(adapted, *args).block_until_ready(),
    }
    phase = start_phase()
    with compile_seconds() as compiling:
        for run in runs.values():
            run()
    medians = interleaved_median_times(runs, spec.repeats)
    gap = float(jnp.max(jnp.abs(plain(merged, *args) - unmerged(adapted, *args))))
    return {
        "system": "jax_forward", **backend_fields(), "kind": "forward",
        "base_s": medians["base"], "merged_s": medians["merged"], "unmerged_s": medians["unmerged"],
        "merged_over_base": medians["merged"] / medians["base"],
        "unmerged_over_base": medians["unmerged"] / medians["base"],
        "merged_vs_unmerged_max_abs_logit_diff": gap,
        "compile_s": sum(compiling),
        **memory_fields(phase, None, device_peak_bytes()),
    }


def generation_config(spec: BenchSpec) -> GenerationConfig:
    """Beam search that always runs max_new_tokens steps (EOS is blocked by min_length), so both frameworks decode
    the same number of tokens whatever the random weights predict."""
    config = model_config(spec)
    return GenerationConfig(
        num_beams=spec.num_beams, max_new_tokens=spec.new_tokens, min_length=spec.new_tokens + 1, length_penalty=1.0,
        no_repeat_ngram_size=0, early_stopping=False, forced_bos_token_id=None, forced_eos_token_id=None,
        decoder_start_token_id=config.decoder_start_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


def bench_generate(spec: BenchSpec, build=build_model, weight_bytes: float = 4.0) -> dict[str, Any]:
    """Beam-search throughput of `generate_padded` (jitted while_loop with a KV cache) on the base weights (those of
    `build(spec)`), and the time of one decoding step: the call minus its prefill (encoder and cross-attention
    keys/values, timed alone), over the number of steps. `weight_bytes`: bytes per stored decoder / head weight,
    for the bytes a step must read (bench/bandwidth.py)."""
    model, params = build(spec)
    batch = device_batch(spec)
    cfg = generation_config(spec)

    def run():
        return np.asarray(generate_padded(model, params, batch["input_ids"], batch["attention_mask"], generation_config=cfg))

    def encode_and_cache(p, ids, mask):
        encoded = model.apply({"params": p}, ids, mask, method="encode")
        return model.apply({"params": p}, encoded, cfg.total_length, cfg.num_beams, method="init_cache")

    prefill = jax.jit(encode_and_cache)
    phase = start_phase()
    timing = time_generate(run, spec, compile_seconds())
    prefill_s, _ = median_time(lambda: jax.block_until_ready(prefill(params, batch["input_ids"], batch["attention_mask"])),
                               spec.gen_repeats, warmup=1)
    step_bytes = decode_step_bytes(spec.model_fields(), spec.batch, spec.num_beams, spec.source_len,
                                   cfg.total_length, weight_bytes, weight_bytes)
    return {"system": "jax_generate", **backend_fields(), **timing, "prefill_s": prefill_s,
            "decode_step_s": (timing["time_s"] - prefill_s) / spec.new_tokens, "decode_step_bytes": step_bytes,
            **memory_fields(phase, None, device_peak_bytes())}


def bench_checkpoint(spec: BenchSpec) -> dict[str, Any]:
    """Bytes on disk of an adapter checkpoint (`lora_jax.save_adapter`) vs the full model
    (`save_pretrained`: model.safetensors and flax_model.msgpack)."""
    from lora_jax.checkpoints.adapter import save_adapter
    from lora_jax.checkpoints.files import dir_bytes

    model, params = build_model(spec)
    lora = lora_config(spec)
    adapted = random_adapter(params, lora, spec.seed + 3)
    raw = sum(x.nbytes for x in jax.tree_util.tree_leaves(lora_jax.adapter_params(adapted, lora)))
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(os.path.join(tmp, "adapter"), adapted, lora, base_model=f"bench-{spec.model}")
        lora_jax.save_pretrained(os.path.join(tmp, "full"), params, model.config)
        adapter_bytes = dir_bytes(os.path.join(tmp, "adapter"))
        safetensors_bytes = os.path.getsize(os.path.join(tmp, "full", "model.safetensors"))
        msgpack_bytes = os.path.getsize(os.path.join(tmp, "full", "flax_model.msgpack"))
    return {
        "system": "checkpoint", **backend_fields(), "kind": "checkpoint",
        "adapter_bytes": adapter_bytes, "adapter_raw_bytes": int(raw),
        "full_safetensors_bytes": safetensors_bytes, "full_msgpack_bytes": msgpack_bytes,
        "adapter_over_full": adapter_bytes / safetensors_bytes,
    }
