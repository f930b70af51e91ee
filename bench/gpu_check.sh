#!/usr/bin/env bash
# One prepared GPU check (issue 25): bench/gpu_check.sh OUT_DIR [--dry-run] [--budget S]
# Runs `python -m bench.gpu` from the repository root with it on PYTHONPATH; a hard 8-minute limit on top of the
# script's own time budget. Needs one NVIDIA GPU, jax[cuda12], flax, optax, orbax-checkpoint, transformers, and a CUDA
# torch with peft. Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bench/gpu_check.sh OUT_DIR [--dry-run] [--budget SECONDS]" >&2
  exit 2
fi
out="$1"; shift
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --kill-after=10 480 "${PYTHON:-python}" -m bench.gpu --out "$out" "$@"
