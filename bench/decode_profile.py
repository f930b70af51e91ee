"""Where a beam-search call's time goes, by XLA operation: one `jax.profiler` trace of `generate_padded` (bench.run's
jax_generate setting: bart-base size, random weights, batch 4, 4 beams, 256 source tokens, 64 new tokens; the
jitted decoding loop `generate_padded` calls), summed
per operation over the call, with each operation's share and the bytes of its operands (from the compiled HLO), so a
matmul's achieved GB/s can be set against the machine's read bandwidth (bench.run's matmul row).

    python -m bench.decode_profile [--model base --batch 4 --source-len 256 --target-len 64 --top 25]

Prints one JSON object (categories and the top operations) and a markdown table. An operation's time is the wall time
its spans cover (the union over XLA's worker threads), so its GB/s compares with the measured read bandwidth; on a
machine with other work running it includes waiting, and the shares are what to read.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile

import jax
import numpy as np

from bench.common import add_shape_arguments, shape_spec
from bench.jax_bench import build_model, device_batch, generation_config
from lora_jax.generation.api import resolve_config
from lora_jax.generation.search import decode_jit

# Spans that contain other operations (the executor's own, and loops / conditionals whose bodies are traced too)
SKIP = ("ThunkExecutor", "SlinkyThreadPool", "while", "conditional", "call")
DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "pred": 1}


def _bytes(result: str) -> int:
    shapes = re.findall(r"\b(f32|s32|u32|bf16|f16|s8|u8|pred)\[([\d,]*)\]", result)
    return sum(DTYPE_BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d] or [1])) for t, dims in shapes)


def operand_bytes(hlo_text: str) -> dict[str, int]:
    """name -> bytes read and written by each instruction of the compiled module: its result plus its operands
    (each operand's own result shape)."""
    results, operands = {}, {}
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*?)\)", line)
        if match:
            results[match.group(1)] = _bytes(match.group(2))
            operands[match.group(1)] = re.findall(r"%([\w.\-]+)", match.group(4))
    return {name: results[name] + sum(results.get(o, 0) for o in ops) for name, ops in operands.items()}


def op_times(trace_dir: str) -> tuple[collections.Counter, collections.Counter]:
    """(wall nanoseconds, calls) per operation name over every XLA worker thread of the trace. Wall time is the union
    of the operation's spans across threads (a matmul split over 2 threads for 4 ms is 4 ms, not 8): what its GB/s
    is computed from."""
    path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
    spans, calls = collections.defaultdict(list), collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            if "XLA" not in line.name:
                continue
            for event in line.events:
                if not event.name.startswith(SKIP):
                    spans[event.name].append((event.start_ns, event.end_ns))
                    calls[event.name] += 1
    wall = collections.Counter()
    for name, intervals in spans.items():
        end = -1.0
        for start, stop in sorted(intervals):
            wall[name] += max(0.0, stop - max(start, end))
            end = max(end, stop)
    return wall, calls


def category(name: str) -> str:
    base = name.split(".")[0]
    return {"ynn_fusion": "matmul (YNNPACK)", "dot": "matmul (XLA)", "custom-call": "top-k"}.get(
        base, "gather (cache reorder, beams)" if "gather" in base else "copy" if "copy" in base else "element-wise")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(ap)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    spec = shape_spec(args)
    model, params = build_model(spec)
    batch = device_batch(spec)
    cfg = resolve_config(model, generation_config(spec))  # the settings generate_padded would compile with
    # One compilation: the program whose HLO names the operations is the one that runs under the profiler.
    compiled = decode_jit.lower(model, cfg, params, batch["input_ids"], batch["attention_mask"]).compile()
    run = lambda: jax.block_until_ready(compiled(params, batch["input_ids"], batch["attention_mask"]))
    run()  # first-call allocations out of the trace
    sizes = operand_bytes(compiled.as_text())
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            run()
        times, calls = op_times(trace_dir)
    total = sum(times.values())
    by_category = collections.Counter()
    for name, ns in times.items():
        by_category[category(name)] += ns
    top = [{"op": n, "category": category(n), "ms": ns / 1e6, "share": ns / total, "calls": calls[n],
            "bytes_per_call": sizes.get(n), "gb_per_s": sizes[n] * calls[n] / ns if sizes.get(n) else None}
           for n, ns in times.most_common(args.top)]
    print(json.dumps({"total_ms": total / 1e6, "categories": {k: v / total for k, v in by_category.most_common()},
                      "top": top}))
    print("\n| category | share of the call's operation time |\n|---|---|")
    print("\n".join(f"| {k} | {v / total:.1%} |" for k, v in by_category.most_common()))
    print("\n| operation | category | calls | ms | share | MB per call | GB/s |\n|---|---|---|---|---|---|---|")
    for t in top:
        mb = "—" if t["bytes_per_call"] is None else f"{t['bytes_per_call'] / 1e6:.1f}"
        rate = "—" if t["gb_per_s"] is None else f"{t['gb_per_s']:.1f}"
        print(f"| {t['op']} | {t['category']} | {t['calls']} | {t['ms']:.1f} | {t['share']:.1%} | {mb} | {rate} |")


if __name__ == "__main__":
    sys.exit(main())
