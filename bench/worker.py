"""One benchmark system in this process (the runner starts one such child per system, so each peak-memory
reading belongs to one system alone).

    python -m bench.worker SYSTEM --spec '{"model": "tiny", ...}' [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import sys

from bench.common import BenchSpec, emit


@dataclasses.dataclass(frozen=True)
class System:
    """A benchmark: where its function lives, the optional packages it needs, and what it measures."""

    module: str
    function: str
    requires: tuple[str, ...]
    what: str

    def missing(self) -> list[str]:
        return [name for name in self.requires if importlib.util.find_spec(name) is None]


# The runner's default order: the matmul reference first, then each training pair, then inference and sizes.
SYSTEMS: dict[str, System] = {
    "matmul": System("bench.jax_bench", "bench_matmul", (), "jitted n x n fp32 matmul (the machine's reference rate)"),
    "jax_lora": System("bench.jax_bench", "bench_lora_train", (), "lora_jax LoRA train step"),
    "peft_lora": System("bench.torch_bench", "bench_peft_train", ("torch", "peft"), "PEFT LoRA train step (PyTorch)"),
    "jax_full": System("bench.jax_bench", "bench_full_train", (), "lora_jax full fine-tuning train step"),
    "torch_full": System("bench.torch_bench", "bench_full_train", ("torch",), "PyTorch full fine-tuning train step"),
    "jax_forward": System("bench.jax_bench", "bench_forward", (), "forward latency: base, merged, unmerged adapters"),
    "jax_generate": System("bench.jax_bench", "bench_generate", (), "lora_jax beam-search generation"),
    "torch_generate": System("bench.torch_bench", "bench_generate", ("torch",), "transformers PyTorch generate"),
    "checkpoint": System("bench.jax_bench", "bench_checkpoint", (), "adapter vs full checkpoint bytes"),
    # LoRA on a lighter frozen base (bench/jax_precision.py): bfloat16 storage, int8, NF4.
    "jax_lora_bf16": System("bench.jax_precision", "bench_lora_bf16", (), "lora_jax LoRA train step, bfloat16 base"),
    "jax_lora_int8": System("bench.jax_precision", "bench_lora_int8", (), "lora_jax LoRA train step, int8 base"),
    "jax_lora_nf4": System("bench.jax_precision", "bench_lora_nf4", (), "lora_jax LoRA train step, NF4 base"),
    "jax_generate_int8": System("bench.jax_precision", "bench_generate_int8", (), "lora_jax beam search, int8 base"),
    "jax_compile": System("bench.compile_time", "bench_compile", (),
                          "LoRA train-step compile time: unrolled / scanned cold, scanned from the persistent cache"),
}

# Systems that `bench.run` does not run by default (it runs SYSTEMS); `python -m bench.gpu` runs them by name.
EXTRA_SYSTEMS: dict[str, System] = {
    "gpu_checks": System("bench.gpu_checks", "bench_gpu_checks", (),
                         "GPU test subset: forward/generation parity vs the CPU, cuDNN attention, bf16"),
}
ALL_SYSTEMS: dict[str, System] = {**SYSTEMS, **EXTRA_SYSTEMS}


def run_system(name: str, spec: BenchSpec) -> dict:
    """The JSON record of system `name` on `spec` (imports only that system's framework)."""
    system = ALL_SYSTEMS[name]
    missing = system.missing()
    if missing:
        raise ImportError(f"system {name!r} needs {missing}: pip install 'lora_jax[torch]'")
    if system.module.startswith("bench.jax"):
        from lora_jax.training.runtime import use_memory_aware_cpu_scheduler

        use_memory_aware_cpu_scheduler()  # as `python -m train` does; must precede the first JAX computation
    record = getattr(importlib.import_module(system.module), system.function)(spec)
    record.pop("system", None)
    return {"system": name, "status": "ok", **spec.describe(), **record}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("system", choices=sorted(ALL_SYSTEMS))
    parser.add_argument("--spec", default="{}", help="BenchSpec as JSON (default: the tiny model's defaults)")
    parser.add_argument("--out", default=None, help="append the JSON line to this file instead of printing it")
    args = parser.parse_args(argv)
    emit(run_system(args.system, BenchSpec.from_json(args.spec)), args.out)


if __name__ == "__main__":
    sys.exit(main())
