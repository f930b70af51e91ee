"""Benchmark runner: each system in its own child process, one after another; prints one JSON line per measurement,
a summary line, then markdown tables with the issue-6 targets.

    python -m bench.run --model tiny                                   # every system, about a minute
    python -m bench.run --model base --batch 4 --source-len 256 --target-len 64 --steps 5
    python -m bench.run --model base --systems matmul jax_lora peft_lora

JSON lines go to stdout (and to --json-out); the children's own output goes to stderr. Timings are only comparable
within one run on a quiet machine.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from bench.common import DEFAULT_SHAPES, MODEL_SIZES, BenchSpec, cpu_count
from bench.report import markdown, summary
from bench.worker import ALL_SYSTEMS, SYSTEMS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("jax", "jaxlib", "flax", "optax", "torch", "peft", "transformers", "numpy")


def _first_field(path: str, prefix: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _first_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown"


def cpu_vector_extensions() -> list[str]:
    """Which of AVX2 / AVX-512F / AMX the CPU reports (they bound the matmul rate)."""
    flags = set((_first_field("/proc/cpuinfo", "flags") or "").split())
    return [name for name in ("avx2", "avx512f", "amx_tile") if name in flags]


def memory_gib() -> float | None:
    total = _first_field("/proc/meminfo", "MemTotal")
    return None if total is None else round(int(total.split()[0]) / 2**20, 1)


def environment(spec: BenchSpec, command: str = "") -> dict[str, Any]:
    """The first JSON line: what ran where, so a result file stands on its own."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"system": "environment", "command": command, "cpu": cpu_model(), "cores": cpu_count(), "cpu_vector_extensions": cpu_vector_extensions(),
            "memory_gib": memory_gib(), "python": platform.python_version(),
            "versions": versions, "spec": dataclasses.asdict(spec)}


def run_child(name: str, spec: BenchSpec, timeout: float, quiet: bool) -> dict[str, Any]:
    """Runs `python -m bench.worker name` and returns its record, or a status 'error' record with its last lines."""
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as out:
        command = [sys.executable, "-m", "bench.worker", name, "--spec", spec.to_json(), "--out", out.name]
        tail: collections.deque[str] = collections.deque(maxlen=15)
        print(f"[bench] {name}: {ALL_SYSTEMS[name].what}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        killer = threading.Timer(timeout, process.kill)  # reading stdout below blocks, so the limit needs a timer
        killer.start()
        try:
            for line in process.stdout:
                tail.append(line.rstrip())
                if not quiet:
                    print(f"  [{name}] {line.rstrip()}", file=sys.stderr, flush=True)
            code = process.wait()
        finally:
            killer.cancel()
        lines = [json.loads(line) for line in out.read().splitlines() if line.strip()]
    wall = time.perf_counter() - started
    if code != 0 or not lines:
        reason = f"killed after the {timeout:g} s limit" if wall >= timeout else f"exit code {code}"
        return {"system": name, "status": "error", "reason": reason, "output_tail": list(tail), "process_s": wall}
    return {**lines[-1], "process_s": wall}


def select_systems(names: list[str] | None) -> list[str]:
    if not names:
        return list(SYSTEMS)
    names = [n for arg in names for n in arg.split(",") if n]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown system(s) {unknown}; choose from {list(SYSTEMS)}")
    return [n for n in SYSTEMS if n in names]  # always the default order (matmul first)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="systems: " + ", ".join(f"{k} ({v.what})" for k, v in SYSTEMS.items()))
    parser.add_argument("--model", choices=sorted(MODEL_SIZES), default="tiny")
    parser.add_argument("--batch", type=int, help="default: 2 (tiny), 4 (base)")
    parser.add_argument("--source-len", type=int, help="default: 32 (tiny), 256 (base)")
    parser.add_argument("--target-len", type=int, help="default: 16 (tiny), 64 (base)")
    parser.add_argument("--steps", type=int, default=5, help="timed train steps per system (median reported; >= 5 for targets)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed train steps first, >= 1 (the first JAX one compiles)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per forward variant")
    parser.add_argument("--gen-repeats", type=int, default=3, help="timed generate calls per framework")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, help="LoRA alpha (default 2 x rank)")
    parser.add_argument("--lora-dropout", type=float, default=0.1)
    parser.add_argument("--dropout", type=float, help="model dropout, attention and activation dropout (default: the model size's)")
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, help="generated tokens per sequence (default: target length)")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--remat", default="dots", help="lora_jax remat policy for both JAX training systems: dots, "
                        "dots_no_batch, full or none (default dots: same speed, less memory)")
    parser.add_argument("--no-scan-layers", action="store_true", help="JAX training systems run their layers unrolled "
                        "(default: one lax.scan per layer stack, model.scan_layers)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="gpu: run every system on the GPU "
                        "(JAX bf16 compute, PyTorch bf16 autocast + sdpa) and report MFU; fails clearly without one")
    parser.add_argument("--systems", nargs="+", help="subset to run, in the default order (space- or comma-separated)")
    parser.add_argument("--json-out", help="also write the JSON lines to this file")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per system before it is killed")
    parser.add_argument("--quiet", action="store_true", help="do not echo the children's output to stderr")
    return parser.parse_args(argv)


def spec_from_args(args: argparse.Namespace) -> BenchSpec:
    shapes = DEFAULT_SHAPES[args.model]
    return BenchSpec(
        model=args.model,
        batch=args.batch or shapes["batch"],
        source_len=args.source_len or shapes["source_len"],
        target_len=args.target_len or shapes["target_len"],
        steps=args.steps, warmup=args.warmup, repeats=args.repeats, gen_repeats=args.gen_repeats, rank=args.rank,
        alpha=args.alpha if args.alpha is not None else 2.0 * args.rank, lora_dropout=args.lora_dropout,
        dropout=args.dropout, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
        matmul_size=args.matmul_size, torch_threads=args.torch_threads, seed=args.seed,
        remat=None if args.remat == "none" else args.remat, scan_layers=not args.no_scan_layers, device=args.device,
    )


def jax_backend() -> str:
    """The platform JAX picks in a fresh process (the runner itself never imports JAX)."""
    out = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"], capture_output=True,
                         text=True, cwd=REPO_ROOT)
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else "unknown"


def check_gpu_present(backend: str) -> None:
    if backend != "gpu":
        raise SystemExit(f"bench: --device gpu, but no GPU is present (JAX's backend here is {backend!r}); run on a "
                         "machine with an NVIDIA GPU and jax[cuda12] (and a CUDA torch for the PyTorch rows), or drop "
                         "--device gpu")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        spec = spec_from_args(args)
    except ValueError as e:
        raise SystemExit(f"bench: {e}") from None
    if spec.device == "gpu":
        check_gpu_present(jax_backend())
    if spec.steps < 5:
        print(f"[bench] note: --steps {spec.steps} < 5; the issue-6 targets ask for a median of >= 5", file=sys.stderr)
    lines, records, failures = [], {}, {}

    def output(record: dict[str, Any]) -> None:
        lines.append(record)
        print(json.dumps(record), flush=True)

    output(environment(spec, shlex.join(["python", "-m", "bench.run", *argv])))
    for name in select_systems(args.systems):
        missing = SYSTEMS[name].missing()
        if missing:
            record = {"system": name, "status": "skipped", "reason": f"needs {', '.join(missing)} (pip install 'lora_jax[torch]')"}
        else:
            record = run_child(name, spec, args.timeout, args.quiet)
        output(record)
        if record.get("status") == "ok":
            records[name] = record
        else:
            failures[name] = record.get("reason", "failed")
    final = summary(records)
    output(final)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
    print()
    print(markdown(lines[0], records, final, failures))
    return 1 if any(r.get("status") == "error" for r in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
