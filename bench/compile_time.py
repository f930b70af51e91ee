"""Compile time of the LoRA train step (system `jax_compile`): unrolled layers cold, scanned layers cold, and
scanned layers read back from JAX's persistent compilation cache.

Each reading is a fresh child process (`python -m bench.compile_time --spec ... --cache-dir DIR --scan 0|1`), so
neither JAX's in-memory caches nor a warm compiler carry over: "cold" children get an empty cache directory, the
"from the cache" child the directory the scanned cold child filled, as a re-run or a resume of `python -m train`
would. The seconds are JAX's own (tracing + lowering + compiling or reading the cache, from `jax.monitoring`, via
`lora_jax.training.compile_events`), for the first train step of the bench's LoRA setting (remat and batch as the spec says).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

from bench.common import BenchSpec, emit

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (record prefix, scanned layers, reuse the scanned cold child's cache directory)
READINGS = (("unrolled_cold", False, False), ("scanned_cold", True, False), ("scanned_cached", True, True))


def measure(spec: BenchSpec, scan: bool, cache_dir: str) -> dict[str, Any]:
    """In this process: the compile stats of the first LoRA train step with the cache in `cache_dir`."""
    from lora_jax.training.runtime import enable_compilation_cache, use_memory_aware_cpu_scheduler

    use_memory_aware_cpu_scheduler()
    enable_compilation_cache(cache_dir)
    import jax
    import optax

    import lora_jax
    from bench.jax_bench import build_model, device_batch, lora_config

    model, params = build_model(spec)
    model = model.clone(remat=spec.remat, scan_layers=scan)
    lora = lora_config(spec)
    params = lora_jax.init_lora(params, lora, jax.random.PRNGKey(spec.seed + 1))
    tx = lora_jax.lora_optimizer(optax.adamw(spec.learning_rate, weight_decay=0.0), lora)
    state = lora_jax.create_train_state(params, lora, tx, stack_layers=scan)  # as python -m train
    del params
    train_step = lora_jax.make_train_step(model, lora)
    state, metrics = train_step(state, device_batch(spec), jax.random.PRNGKey(spec.seed + 2))
    jax.block_until_ready(metrics)
    stats = train_step.compile_stats()
    return {"compile_s": stats.seconds, "compilations": stats.compilations, "cache_hits": stats.cache_hits,
            "backend": jax.default_backend()}


def _child(spec: BenchSpec, scan: bool, cache_dir: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.compile_time", "--spec", spec.to_json(), "--cache-dir", cache_dir,
               "--scan", str(int(scan))]
    out = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"compile-time child (scan={scan}) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_compile(spec: BenchSpec) -> dict[str, Any]:
    """The three readings, one child each, in order (the cached one reads what the scanned cold one wrote)."""
    record: dict[str, Any] = {"kind": "compile"}
    with tempfile.TemporaryDirectory() as tmp:
        for name, scan, reuse in READINGS:
            cache_dir = os.path.join(tmp, "scanned" if reuse or scan else name)
            reading = _child(spec, scan, cache_dir)
            record.update({f"{name}_s": reading["compile_s"], f"{name}_compilations": reading["compilations"],
                           f"{name}_cache_hits": reading["cache_hits"]})
            record["backend"] = reading["backend"]
    return record


def compile_table(records: dict[str, dict]) -> str:
    """Markdown rows of the `jax_compile` record."""
    r = records["jax_compile"]
    rows = ["| train step | compile s | compilations | persistent-cache hits |", "|---|---|---|---|"]
    for name, label in (("unrolled_cold", "unrolled layers, cold"), ("scanned_cold", "scanned layers, cold"),
                        ("scanned_cached", "scanned layers, from the persistent cache")):
        seconds = r.get(f"{name}_s")
        rows.append(f"| {label} | {'—' if seconds is None else f'{seconds:.2f}'} | {r.get(f'{name}_compilations')} "
                    f"| {r.get(f'{name}_cache_hits')} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one compile-time reading (a child of the jax_compile system)")
    parser.add_argument("--spec", required=True, help="BenchSpec as JSON")
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--scan", type=int, choices=(0, 1), required=True)
    args = parser.parse_args(argv)
    emit(measure(BenchSpec.from_json(args.spec), bool(args.scan), args.cache_dir), None)


if __name__ == "__main__":
    sys.exit(main())
