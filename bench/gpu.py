"""One prepared GPU check (issue 25): on a machine with one NVIDIA GPU, in at most 8 minutes and without network, runs
the GPU test subset, the training table at bart-base and bart-large sizes (lora_jax LoRA and full fine-tuning vs
PEFT / PyTorch with bf16 autocast and sdpa) and 4-beam generation against transformers, and writes
`gpu_check.json` and `gpu_check.md` to the directory it is given.

    PYTHONPATH=. python -m bench.gpu --out results/          # or: bench/gpu_check.sh results/
    PYTHONPATH=. python -m bench.gpu --out /tmp/dry --dry-run  # the same plan on the CPU, tiny model (what the suite runs)

Needs jax with CUDA (jax[cuda12]), flax, optax, orbax-checkpoint, transformers (the project's own dependencies) and,
beyond those, a CUDA build of torch and peft (the optional extra `lora_jax[torch]`). Without a GPU it stops at once
with exit code 2 and says so. Every measurement is one `bench.worker` child (as `python -m bench.run` runs them),
killed at its section's share of the time budget; a section that no longer fits is skipped with the reason recorded.
Exit code 0 when every check passed and no child failed, else 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any

from bench.common import BenchSpec
from bench.gpu_report import gpu_markdown, gpu_summary
from bench.run import environment, jax_backend, run_child

# The packages the check imports; torch and peft are beyond the project's dependencies (pip install 'lora_jax[torch]').
REQUIRED_PACKAGES = ("jax", "flax", "optax", "orbax.checkpoint", "transformers", "torch", "peft")
TRAIN_SYSTEMS = ("jax_lora", "peft_lora", "jax_full", "torch_full")
GENERATE_SYSTEMS = ("jax_generate", "torch_generate")
MIN_CHILD_S = 25.0  # below this a child cannot even import its framework, build weights and compile: skip instead


@dataclasses.dataclass(frozen=True)
class Section:
    """One group of measurements: the systems run one after another on `spec`, each killed after `cap_s` seconds
    (or less, where the remaining budget is shorter)."""

    name: str
    systems: tuple[str, ...]
    spec: BenchSpec
    cap_s: float


def gpu_plan(dry_run: bool) -> list[Section]:
    """The sections in priority order. On the GPU: batches that fill an H200-class card's compute, no remat (the
    memory is there), bf16 compute. Dry run: the same sections on the CPU with the tiny model and one step."""
    if dry_run:
        tiny = dict(model="tiny", batch=2, source_len=8, target_len=4, steps=1, warmup=1, repeats=1, gen_repeats=1,
                    matmul_size=128, torch_threads=1)
        return [
            Section("checks", ("gpu_checks",), BenchSpec(**tiny), 300),
            Section("train tiny", TRAIN_SYSTEMS, BenchSpec(**tiny), 300),
            Section("generate tiny", GENERATE_SYSTEMS, BenchSpec(**tiny, num_beams=4), 300),
        ]
    gpu = dict(device="gpu", remat=None, steps=10, warmup=2, gen_repeats=3)
    return [
        Section("checks", ("gpu_checks",), BenchSpec(model="base", batch=2, source_len=128, target_len=16, num_beams=4,
                                                     **gpu), 120),
        Section("train base", TRAIN_SYSTEMS, BenchSpec(model="base", batch=32, source_len=256, target_len=64, **gpu), 75),
        Section("generate base", GENERATE_SYSTEMS,
                BenchSpec(model="base", batch=16, source_len=256, target_len=64, num_beams=4, **gpu), 75),
        Section("train large", TRAIN_SYSTEMS, BenchSpec(model="large", batch=16, source_len=256, target_len=64, **gpu), 90),
    ]


def child_timeout(cap_s: float, deadline: float, now: float) -> float | None:
    """Seconds the next child may run: its cap, or what is left before the deadline; None when under MIN_CHILD_S."""
    limit = min(cap_s, deadline - now)
    return None if limit < MIN_CHILD_S else limit


def missing_packages() -> list[str]:
    missing = []
    for name in REQUIRED_PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # "orbax" itself missing
            found = False
        if not found:
            missing.append(name)
    return missing


def gpu_description() -> str | None:
    """nvidia-smi's name, driver and memory of the card(s), or None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def preflight(dry_run: bool) -> str:
    """JAX's backend; stops with exit code 2 and the fix when this is not a GPU machine or a package is missing
    (unless dry-running)."""
    backend = jax_backend()
    if dry_run:
        return backend
    if backend != "gpu":
        print(f"bench.gpu: no GPU: JAX's backend here is {backend!r}. Run on a machine with an NVIDIA GPU and "
              "jax[cuda12] installed, or pass --dry-run to check the plan on the CPU.", file=sys.stderr)
        raise SystemExit(2)
    missing = missing_packages()
    if missing:
        print(f"bench.gpu: missing packages {missing}; install jax[cuda12], flax, optax, orbax-checkpoint, "
              "transformers, and a CUDA torch with peft (pip install -e '.[torch]')", file=sys.stderr)
        raise SystemExit(2)
    return backend


def run_sections(plan: list[Section], budget_s: float, quiet: bool) -> list[dict[str, Any]]:
    """Runs every section's systems in order within `budget_s`; returns one record per (section, system)."""
    from bench.worker import ALL_SYSTEMS

    deadline = time.monotonic() + budget_s
    records = []
    for section in plan:
        for name in section.systems:
            missing = ALL_SYSTEMS[name].missing()
            timeout = child_timeout(section.cap_s, deadline, time.monotonic())
            if missing:
                record = {"system": name, "status": "skipped", "reason": f"needs {', '.join(missing)}"}
            elif timeout is None:
                record = {"system": name, "status": "skipped",
                          "reason": f"time budget: under {MIN_CHILD_S:g} s of the {budget_s:g} s left"}
            else:
                record = run_child(name, section.spec, timeout, quiet)
                record["timeout_s"] = timeout
            records.append({"section": section.name, "spec": dataclasses.asdict(section.spec), **record})
            print(f"[bench.gpu] {section.name} / {name}: {record.get('status')} {record.get('reason', '')}",
                  file=sys.stderr, flush=True)
    return records


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for gpu_check.json and gpu_check.md (created)")
    parser.add_argument("--dry-run", action="store_true", help="run the plan on the CPU with the tiny model")
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds for all measurements (default 420: with start-up and the report, within 8 minutes)")
    parser.add_argument("--quiet", action="store_true", help="do not echo the children's output to stderr")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.monotonic()
    backend = preflight(args.dry_run)
    os.makedirs(args.out, exist_ok=True)
    plan = gpu_plan(args.dry_run)
    env = {**environment(plan[1].spec, shlex.join(["python", "-m", "bench.gpu", *argv])), "jax_backend": backend,
           "gpu": gpu_description(), "dry_run": args.dry_run, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    records = run_sections(plan, args.budget, args.quiet)
    result = {"environment": env, "records": records, "summary": gpu_summary(records),
              "wall_s": time.monotonic() - started}
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = gpu_markdown(result)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0 if result["summary"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
