"""The LoRA paper's quality table in miniature, on the synopsis task (configs/synopsis.yaml: write a Debian package's
synopsis from its description): full fine-tuning, LoRA at ranks 1-16 on q,v and on every linear layer, DoRA and PiSSA
at the best LoRA rank, and (when a torch interpreter is given) PEFT LoRA trained side by side with lora_jax's
configs/synopsis.yaml row (r=16 on every linear layer, at that row's chosen rate). Same step
budget for every run; each row's learning rate is chosen on validation ROUGE-L from a sweep that extends itself past
an edge pick (bench.quality_sweep); test ROUGE-1/2/L with 95% bootstrap intervals; 3 seeds for the main rows.
Writes QUALITY.md, quality_rouge_vs_params.png and quality.jsonl. Not part of CI: about 60 runs, each with beam search
on the validation rows (and the test rows for the chosen rate). `--steps 500 --jobs 2` took 89 minutes on 2 CPU cores
(2026-12-04); at the config's 1000 steps expect about three hours.

    python -m bench.quality                                    # everything (QUALITY.md); PEFT row if torch is here
    python -m bench.quality --torch-python /path/to/venv/bin/python   # PEFT row from another venv
    python -m bench.quality --systems full lora_r8_qv --steps 200 --out-dir /tmp/q   # a subset
    python -m bench.quality --quick --out-dir /tmp/q           # smoke test: one tiny row, seconds of training

Each system runs in its own child process (python -m bench.quality --child SPEC), so its peak memory (RSS, the
process's lifetime high-water mark: weights, data, compiled steps, beam search) is its own. A run is
`train.loop.train` itself (the demo's code path) with the run's overrides, then beam search on the test split.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import threading
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO_ROOT, "configs", "synopsis.yaml")
TARGETS = {"qv": ["q_proj", "v_proj"], "all": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}
RANKS = (1, 2, 4, 8, 16)
LORA_LRS = (1e-3, 3e-3, 1e-2)
FULL_LRS = (3e-4, 1e-3, 3e-3)
PISSA_LRS = (1e-4, 3e-4, 1e-3)  # PiSSA trains W's principal part: it wants smaller steps (its paper: 2e-5 at 7B)
# Variants at the best plain-LoRA rank and targets (chosen on validation): extra run-config overrides and start sweep.
VARIANTS = {"dora": (["lora.use_dora=true"], LORA_LRS), "pissa": (["lora.init=pissa"], PISSA_LRS)}
MAIN_SYSTEMS = ("full", "lora_r8_qv", "lora_r16_all", "peft")  # 3 seeds each
# PEFT trains configs/synopsis.yaml's row (r=16 on every linear layer) at that row's chosen rate, so it can start as
# soon as that row is done, beside the other LoRA rows.
PEFT_MIRROR = "lora_r16_all"
SEEDS = (0, 1, 2)
# Full mode scores every validation row (the sweep's choice) and every test row (the table).
FULL_EVAL = ["eval.max_examples=null", "data.max_eval_examples=null"]
QUICK = {"systems": ["lora_r2_qv"], "steps": 4, "lrs": [3e-3], "max_extensions": 0,
         "sets": ["eval.max_examples=8", "data.max_eval_examples=8", "eval.num_beams=1", "eval.max_new_tokens=8",
                  "train.eval_batch_size=8"]}


def systems() -> dict[str, dict]:
    """name -> {"mode", "rank", "targets", "lrs", "extra"} of every fixed row; the variants and PEFT take their
    rank and targets from the best LoRA row at run time (`at_best_rank`)."""
    out = {"full": {"mode": "full", "rank": None, "targets": None, "lrs": list(FULL_LRS), "extra": []}}
    for tname, targets in TARGETS.items():
        for r in RANKS:
            out[f"lora_r{r}_{tname}"] = {"mode": "lora", "rank": r, "targets": targets, "lrs": list(LORA_LRS), "extra": []}
    for name, (extra, lrs) in VARIANTS.items():
        out[name] = {"mode": "lora", "rank": None, "targets": None, "lrs": list(lrs), "extra": extra}
    out["peft"] = {"mode": "peft", "rank": None, "targets": None, "lrs": list(LORA_LRS), "extra": []}
    return out


def at_best_rank(spec: dict, records: list[dict]) -> dict:
    """A variant / PEFT spec with the rank and targets of the plain-LoRA row with the best validation ROUGE-L (its
    chosen learning rate, seed 0); PEFT also reuses that row's learning rate, so both sides train the same recipe."""
    lora = [r for r in records if r["system"].startswith("lora_") and r["chosen"] and r["seed"] == 0]
    if not lora:
        raise SystemExit(f"{spec['name']} runs at the best LoRA rank: include at least one lora_r* system before it")
    best = max(lora, key=lambda r: r["validation"]["rougeL"])
    out = {**spec, "rank": best["rank"], "targets": best["targets"], "best_lora": best["system"]}
    if spec["mode"] == "peft":
        out["lrs"] = [best["learning_rate"]]
    return out


def mirroring(spec: dict, records: list[dict], row: str) -> dict:
    """The PEFT spec with the rank, targets and chosen learning rate of lora_jax row `row` (seed 0), so both sides
    train the same recipe."""
    chosen = [r for r in records if r["system"] == row and r["chosen"] and r["seed"] == 0]
    if not chosen:
        raise SystemExit(f"{spec['name']} mirrors {row}: run {row} before it")
    return {**spec, "rank": chosen[0]["rank"], "targets": chosen[0]["targets"], "lrs": [chosen[0]["learning_rate"]],
            "best_lora": row}


def dependencies(name: str, names: list[str]) -> list[str]:
    """The rows `name` needs finished first: PEFT its mirror row (PEFT_MIRROR, else every LoRA row: it then takes
    the best), DoRA and PiSSA every plain LoRA row (they run at the best rank)."""
    lora = [n for n in names if n.startswith("lora_")]
    if name == "peft":
        return [PEFT_MIRROR] if PEFT_MIRROR in names else lora
    return lora if name in VARIANTS else []


def spec_at_run_time(spec: dict, records: list[dict], names: list[str]) -> dict:
    if spec["name"] == "peft" and PEFT_MIRROR in names:
        return mirroring(spec, records, PEFT_MIRROR)
    if spec["name"] == "peft" or spec["name"] in VARIANTS:
        return at_best_rank(spec, records)
    return spec


def overrides(spec: dict, lr: float, seed: int, out_dir: str) -> list[str]:
    """The run's config overrides: mode, recipe, and (for LoRA) rank, alpha = 2r, targets."""
    sets = [f"lora.mode={'full' if spec['mode'] == 'full' else 'lora'}", f"optim.learning_rate={lr}",
            f"train.seed={seed}", f"train.num_steps={spec['steps']}", f"train.output_dir={out_dir}",
            "eval.rouge_before=false", f"train.save_every={spec['steps']}", f"train.eval_every={spec['steps']}",
            "eval.num_samples=0", "train.keep_checkpoints=1", *spec.get("sets", [])]
    if spec["mode"] != "full":
        sets += [f"lora.rank={spec['rank']}", f"lora.alpha={2 * spec['rank']}", f"lora.targets={json.dumps(spec['targets'])}"]
    return sets + spec.get("extra", [])


def run_one(spec: dict, lr: float, seed: int, work: str) -> dict:
    """Trains one (system, lr, seed) through the demo's code path: validation ROUGE, eval loss, wall time, and where
    the adapter (or model) went."""
    from train.config import load_config
    from train.loop import train

    out_dir = os.path.join(work, f"{spec['name']}_lr{lr:g}_s{seed}")
    cfg = load_config(spec["config"], overrides(spec, lr, seed, out_dir))
    start = time.perf_counter()
    summary = train(cfg)
    wall = time.perf_counter() - start
    return {"system": spec["name"], "mode": spec["mode"], "rank": spec["rank"], "targets": spec["targets"],
            "learning_rate": lr, "seed": seed, "steps": spec["steps"], "eval_loss": summary["eval_loss"],
            "validation": summary["rouge_after"], "train_wall_s": wall, "saved": summary["saved"]["path"],
            "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
            "train_compilations": summary["train_compilations"]}


def test_predictions(spec: dict, record: dict, work: str) -> tuple[list[str], list[str]]:
    """(predictions, references) on the test split of a trained run (its adapter on the base, or its model)."""
    from train.build import build
    from train.config import load_config
    from train.evaluate import summarize

    sets = overrides(spec, record["learning_rate"], record["seed"], work)
    if spec["mode"] == "full":
        run = build(load_config(spec["config"], sets + [f"model.checkpoint={record['saved']}"]), for_training=False)
    else:
        run = build(load_config(spec["config"], sets), for_training=False, adapter_dir=record["saved"])
    preds, refs, _ = summarize(run.apply_model, run.params, run.tokenizer, run.splits["test"], run.cfg, run.gen,
                               run.pad_id, run.start_id)
    return preds, refs


def with_test_scores(record: dict, preds: list[str], refs: list[str]) -> dict:
    """The record with test ROUGE (+ 95% interval) and per-example F-measures (for the seed-averaged interval)."""
    from bench.quality_rouge import per_example_scores, rouge_with_intervals

    return {**record, "test": rouge_with_intervals(preds, refs), "test_per_example": per_example_scores(preds, refs),
            "test_samples": [{"prediction": p, "reference": r} for p, r in list(zip(preds, refs))[:5]]}


def child(spec: dict, out: str | None) -> None:
    """One system: its learning-rate sweep (seed 0, extended past an edge pick), then the other seeds at the chosen
    rate; test ROUGE for the chosen rate's runs only (the others are never looked at on test)."""
    from bench.common import emit
    from bench.memory import max_rss_bytes
    from bench.quality_sweep import sweep
    from lora_jax.training.runtime import use_memory_aware_cpu_scheduler

    use_memory_aware_cpu_scheduler()
    runs: dict[float, dict] = {}
    with tempfile.TemporaryDirectory() as work:
        def score(lr: float) -> float:
            runs[lr] = run_one(spec, lr, 0, work)
            return runs[lr]["validation"]["rougeL"]

        result = sweep(score, spec["lrs"], max_extensions=spec.get("max_extensions", 3))
        records = [dict(r, chosen=lr == result.best, edge=result.edge) for lr, r in sorted(runs.items())]
        records += [dict(run_one(spec, result.best, s, work), chosen=True, edge=result.edge)
                    for s in spec["seeds"] if s != 0]
        records = [with_test_scores(r, *test_predictions(spec, r, work)) if r["chosen"] else {**r, "test": None}
                   for r in records]
    for record in records:
        record.pop("saved")
        emit({**record, "peak_rss_bytes": max_rss_bytes()}, out)


def _run_child(spec: dict, part: str, torch_python: str | None, reuse: bool = False,
               cores: set[int] | None = None) -> list[dict]:
    """The system in its own process (PEFT: in the torch interpreter, bench.quality_torch), writing its records to
    its own file `part` (so that rows running side by side never share a file); returns them. With `reuse`, a row
    that finished before with exactly this spec (`part`.done holds it) is read back instead of run again. `cores`:
    the CPU cores the child may use (None: all)."""
    marker = part + ".done"
    if reuse and os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == spec:
                with open(part) as f:
                    return [json.loads(line) for line in f]
    if spec["mode"] == "peft":
        cmd = [torch_python, "-m", "bench.quality_torch", "--spec", json.dumps(spec), "--json-out", part]
    else:
        cmd = [sys.executable, "-m", "bench.quality", "--child", json.dumps(spec), "--json-out", part]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))}
    if cores is not None:  # one thread per child (XLA sizes its pool by the affinity mask; torch by OMP_NUM_THREADS)
        env["OMP_NUM_THREADS"] = str(len(cores))
    open(part, "w").close()
    with open(part + ".log", "w") as log:
        done = subprocess.run(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                              preexec_fn=None if cores is None else lambda: os.sched_setaffinity(0, cores))
    if done.returncode != 0:
        with open(part + ".log") as log:
            tail = log.read()[-3000:]
        raise SystemExit(f"{spec['name']} failed (exit {done.returncode}); its log {part}.log ends:\n{tail}")
    with open(part) as f:
        records = [json.loads(line) for line in f]
    with open(marker, "w") as f:
        json.dump(spec, f)
    for record in records:
        print(json.dumps({k: record[k] for k in ("system", "learning_rate", "seed", "validation", "test")
                          if k in record}), flush=True)
    return records


def _run_rows(specs: list[dict], parts_dir: str, torch_python: str | None, jobs: int,
              reuse: bool) -> dict[str, list[dict]]:
    """Runs every spec (each in its own child process), `jobs` at a time, in the given order except that a row waits
    for its `dependencies` (its rank, targets or rate are then read from their records); name -> its records.
    With jobs > 1 each child is pinned to its own share of the cores: several multi-threaded XLA processes on the
    same cores spend their time in each other's spin-waits (2 unpinned jobs on 2 cores trained at 4.5 steps/s each,
    one alone at 11)."""
    jobs = max(1, jobs)
    available = sorted(os.sched_getaffinity(0))
    names = [s["name"] for s in specs]
    pending, done, failures = list(specs), {}, []
    ready = threading.Condition()

    def next_spec() -> dict | None:
        with ready:
            while pending and not failures:
                for spec in pending:
                    if all(d in done for d in dependencies(spec["name"], names)):
                        pending.remove(spec)
                        records = [r for n in names if n in done for r in done[n]]
                        return spec_at_run_time(spec, records, names)
                ready.wait()
            return None

    def lane(cores: set[int] | None) -> None:
        while (spec := next_spec()) is not None:
            try:
                records = _run_child(spec, os.path.join(parts_dir, f"{spec['name']}.jsonl"), torch_python, reuse, cores)
            except BaseException as error:  # the other lanes finish their row and stop
                with ready:
                    failures.append(error)
                    ready.notify_all()
                return
            with ready:
                done[spec["name"]] = records
                ready.notify_all()

    lanes = [threading.Thread(target=lane, args=(None if jobs == 1 else set(available[i::jobs]) or None,))
             for i in range(jobs)]
    for t in lanes:
        t.start()
    for t in lanes:
        t.join()
    if failures:
        raise failures[0]
    return done


def _parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", nargs="*", default=None, help=f"rows to run (default all): {', '.join(systems())}")
    ap.add_argument("--config", default=CONFIG, help="the task's run config (default: configs/synopsis.yaml)")
    ap.add_argument("--steps", type=int, default=None, help="train steps per run (default: the config's)")
    ap.add_argument("--out-dir", default=REPO_ROOT, help="where QUALITY.md, the plot and quality.jsonl go")
    ap.add_argument("--seeds", type=int, default=None,
                    help=f"seeds per row (default: {len(SEEDS)} for {', '.join(MAIN_SYSTEMS)}, 1 for the others)")
    ap.add_argument("--torch-python", default=None,
                    help="a Python with torch + peft for the PEFT row (default: this one, if it has both)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="rows trained side by side, each in its own process (the small demo base leaves cores idle: "
                         "2 on 2 cores nearly halves the wall time; each row's wall time is then measured beside another)")
    ap.add_argument("--reuse", action="store_true",
                    help="read back rows that finished in an earlier run into the same --out-dir with the same spec "
                         "(their records under quality_runs/) instead of training them again")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: one LoRA row (+ PEFT), one rate, 4 steps on the validation file, 8 eval rows")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _command(args, names: list[str]) -> str:
    parts = ["python -m bench.quality"] + (["--quick"] if args.quick else [])
    parts += [] if args.systems is None else ["--systems", *names]
    parts += [f"--steps {args.steps}"] * bool(args.steps) + [f"--seeds {args.seeds}"] * bool(args.seeds)
    parts += ["--torch-python PY"] * bool(args.torch_python) + [f"--jobs {args.jobs}"] * (args.jobs > 1)
    return " ".join(parts)


def main(argv=None) -> None:
    args = _parse(argv)
    if args.child is not None:
        return child(json.loads(args.child), args.json_out)
    from bench.quality_report import write_report
    from train.config import load_config

    if args.torch_python is None and all(importlib.util.find_spec(m) for m in ("torch", "peft")):
        args.torch_python = sys.executable
    table = systems()
    names = list(args.systems or (QUICK["systems"] + ["peft"] * bool(args.torch_python) if args.quick else table))
    if args.torch_python is None and "peft" in names:
        if args.systems is not None:
            raise SystemExit("the peft row needs --torch-python (a Python with torch and peft installed)")
        names.remove("peft")
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise SystemExit(f"unknown system(s) {unknown}; choose from {', '.join(table)}")
    steps = args.steps or (QUICK["steps"] if args.quick else load_config(args.config).train.num_steps)
    os.makedirs(args.out_dir, exist_ok=True)
    results = os.path.join(args.out_dir, "quality.jsonl")
    parts_dir = os.path.join(args.out_dir, "quality_runs")
    os.makedirs(parts_dir, exist_ok=True)
    started = time.time()

    def spec_of(name: str) -> dict:
        seeds = SEEDS[:args.seeds or 1] if args.seeds or args.quick else SEEDS if name in MAIN_SYSTEMS else SEEDS[:1]
        spec = {**table[name], "name": name, "steps": steps, "seeds": list(seeds), "config": args.config,
                "sets": QUICK["sets"] if args.quick else FULL_EVAL}
        if args.quick:  # trains on the (small) validation file: nothing to tokenize at scale, nothing measured
            quick_sets = QUICK["sets"] + [f"data.train_files={load_config(args.config).data.eval_files}"]
            spec.update(lrs=QUICK["lrs"], max_extensions=QUICK["max_extensions"], sets=quick_sets)
        return spec

    # Main rows (with their 3 seeds) first, then the other LoRA rows; PEFT, DoRA and PiSSA wait for the rows they
    # take their rank and rate from.
    order = sorted(names, key=lambda n: (n in VARIANTS or n == "peft", n not in MAIN_SYSTEMS, list(table).index(n)))
    done = _run_rows([spec_of(n) for n in order], parts_dir, args.torch_python, args.jobs, args.reuse)
    records = [r for n in sorted(done, key=list(table).index) for r in done[n]]
    with open(results, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    write_report(records, args.out_dir, command=_command(args, names), wall_s=time.time() - started,
                 config=args.config, quick=args.quick, jobs=args.jobs)


if __name__ == "__main__":
    sys.exit(main())
