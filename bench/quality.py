"""The LoRA paper's quality table in miniature, on the offline demo task (configs/demo.yaml): full fine-tuning and LoRA
at ranks 1-16 on q,v and on every attention projection, same step budget, each with its own learning-rate sweep chosen
on the validation split and reported on the test split; 3 seeds for the main rows. Writes QUALITY.md and
quality_rouge_vs_params.png. Not part of CI (about an hour on 2 CPU cores).

    python -m bench.quality                       # everything; JSON lines on stdout, results in QUALITY.md
    python -m bench.quality --systems full lora_r8_qv --steps 100 --out-dir /tmp/q   # a subset, quicker

Each system runs in its own child process (python -m bench.quality --child SPEC), so its peak memory (RSS, the
process's lifetime high-water mark: weights, data, compiled steps, beam search) is its own. A run is
`train.loop.train` itself (the demo's code path) with the run's overrides, then a beam-search ROUGE pass on the test
split with the trained adapter or model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO_ROOT, "configs", "demo.yaml")
TARGETS = {"qv": ["q_proj", "v_proj"], "attn": ["q_proj", "k_proj", "v_proj", "out_proj"]}
RANKS = (1, 2, 4, 8, 16)
LORA_LRS = (1e-3, 3e-3, 1e-2)
FULL_LRS = (3e-4, 1e-3, 3e-3)
PISSA_LRS = (1e-4, 3e-4, 1e-3)  # PiSSA trains W's principal part: it wants smaller steps (its paper: 2e-5 at 7B)
# The LoRA variants (issue "Beyond plain LoRA"), on every attention projection at r=16: extra run-config overrides.
VARIANTS = {"dora_r16_attn": (["lora.use_dora=true"], LORA_LRS), "pissa_r16_attn": (["lora.init=pissa"], PISSA_LRS),
            "olora_r16_attn": (["lora.init=olora"], PISSA_LRS)}
MAIN_SYSTEMS = ("full", "lora_r8_qv", "lora_r16_attn")  # 3 seeds each
SEEDS = (0, 1, 2)


def systems() -> dict[str, dict]:
    """name -> {"mode", "rank", "targets", "lrs", "extra"} for every row of the table."""
    out = {"full": {"mode": "full", "rank": None, "targets": None, "lrs": list(FULL_LRS), "extra": []}}
    for tname, targets in TARGETS.items():
        for r in RANKS:
            out[f"lora_r{r}_{tname}"] = {"mode": "lora", "rank": r, "targets": targets, "lrs": list(LORA_LRS), "extra": []}
    for name, (extra, lrs) in VARIANTS.items():
        out[name] = {"mode": "lora", "rank": 16, "targets": TARGETS["attn"], "lrs": list(lrs), "extra": extra}
    return out


def _overrides(spec: dict, lr: float, seed: int, steps: int, out_dir: str) -> list[str]:
    sets = [f"lora.mode={spec['mode']}", f"optim.learning_rate={lr}", f"train.seed={seed}", f"train.num_steps={steps}",
            f"train.output_dir={out_dir}", "eval.rouge_before=false", f"train.save_every={steps}",
            f"train.eval_every={steps}", "eval.num_samples=0", "train.keep_checkpoints=1"]
    if spec["mode"] == "lora":
        sets += [f"lora.rank={spec['rank']}", f"lora.alpha={2 * spec['rank']}", f"lora.targets={json.dumps(spec['targets'])}"]
    return sets + spec.get("extra", [])


def run_one(spec: dict, lr: float, seed: int, steps: int, work: str) -> dict:
    """Trains one (system, lr, seed) through the demo's code path: validation ROUGE, eval loss, wall time, and where
    the adapter (or model) went."""
    from train.config import load_config
    from train.loop import train

    out_dir = os.path.join(work, f"{spec['name']}_lr{lr:g}_s{seed}")
    cfg = load_config(DEMO_CONFIG, _overrides(spec, lr, seed, steps, out_dir))
    start = time.perf_counter()
    summary = train(cfg)
    wall = time.perf_counter() - start
    return {"system": spec["name"], "learning_rate": lr, "seed": seed, "steps": steps, "eval_loss": summary["eval_loss"],
            "validation": summary["rouge_after"], "train_wall_s": wall, "saved": summary["saved"]["path"],
            "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
            "train_compilations": summary["train_compilations"]}


def test_rouge(spec: dict, record: dict, work: str) -> dict:
    """ROUGE on the test split of a trained run (its adapter on the base, or its fully fine-tuned model)."""
    from train.config import load_config
    from train.evaluate import score
    from train.build import build

    sets = _overrides(spec, record["learning_rate"], record["seed"], record["steps"], work)
    if spec["mode"] == "full":
        run = build(load_config(DEMO_CONFIG, sets + [f"model.checkpoint={record['saved']}"]), for_training=False)
    else:
        run = build(load_config(DEMO_CONFIG, sets), for_training=False, adapter_dir=record["saved"])
    scores, *_ = score(run.apply_model, run.params, run.tokenizer, run.splits["test"], run.cfg, run.gen, run.pad_id,
                       run.start_id)
    return scores


def child(spec: dict, out: str | None) -> None:
    """One system: its learning-rate sweep (seed 0), then the other seeds at the chosen rate for main rows; test ROUGE
    for the chosen rate's runs only (the others are never looked at on test)."""
    from bench.common import emit
    from bench.memory import max_rss_bytes
    from lora_jax.training.runtime import use_memory_aware_cpu_scheduler

    use_memory_aware_cpu_scheduler()
    with tempfile.TemporaryDirectory() as work:
        sweep = [run_one(spec, lr, 0, spec["steps"], work) for lr in spec["lrs"]]
        best = max(sweep, key=lambda r: r["validation"]["rougeL"])
        extra = [run_one(spec, best["learning_rate"], s, spec["steps"], work) for s in spec["seeds"] if s != 0]
        for record in sweep + extra:
            chosen = record["learning_rate"] == best["learning_rate"]
            record.update(chosen=chosen, test=test_rouge(spec, record, work) if chosen else None)
    for record in sweep + extra:
        record.pop("saved")
        emit({**record, "peak_rss_bytes": max_rss_bytes()}, out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", nargs="*", default=None, help=f"rows to run (default all): {', '.join(systems())}")
    ap.add_argument("--steps", type=int, default=None, help="train steps per run (default: the demo's)")
    ap.add_argument("--out-dir", default=REPO_ROOT, help="where QUALITY.md, the plot and quality.jsonl go")
    ap.add_argument("--seeds", type=int, default=None,
                    help=f"seeds per row (default: {len(SEEDS)} for {', '.join(MAIN_SYSTEMS)}, 1 for the others)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        return child(json.loads(args.child), args.json_out)
    from bench.quality_report import write_report
    from train.config import load_config

    steps = args.steps or load_config(DEMO_CONFIG).train.num_steps
    table = systems()
    names = args.systems or list(table)
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise SystemExit(f"unknown system(s) {unknown}; choose from {', '.join(table)}")
    os.makedirs(args.out_dir, exist_ok=True)
    results = os.path.join(args.out_dir, "quality.jsonl")
    open(results, "w").close()
    started = time.time()
    for name in names:
        seeds = SEEDS[:args.seeds] if args.seeds else SEEDS if name in MAIN_SYSTEMS else SEEDS[:1]
        spec = {**table[name], "name": name, "steps": steps, "seeds": list(seeds)}
        before = sum(1 for _ in open(results))
        subprocess.run([sys.executable, "-m", "bench.quality", "--child", json.dumps(spec), "--json-out", results],
                       cwd=REPO_ROOT, check=True, stdout=sys.stderr)
        with open(results) as f:
            for line in list(f)[before:]:
                print(line.strip(), flush=True)
    records = [json.loads(line) for line in open(results)]
    command = "python -m bench.quality" + ("" if args.systems is None else " --systems " + " ".join(names)) + (
        f" --steps {args.steps}" if args.steps else "") + (f" --seeds {args.seeds}" if args.seeds else "")
    write_report(records, args.out_dir, command=command, wall_s=time.time() - started)


if __name__ == "__main__":
    sys.exit(main())
