"""QUALITY.md and its plot from bench.quality's records (one JSON record per system, learning rate and seed)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics

import numpy as np

from train.rouge import rouge

ROUGE_COLUMNS = ("rouge1", "rouge2", "rougeL")
PLOT_NAME = "quality_rouge_vs_params.png"


def _rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def baseline_table(data_dir: str) -> dict[str, dict[str, dict[str, float]]]:
    """{split: {rule: ROUGE scores}} for the trivial answers (scripts.make_demo_data.baseline_scores)."""
    from scripts.make_demo_data import baseline_scores

    def score(prediction: str, reference: str):
        s = rouge([prediction], [reference])
        return np.array([s[k] for k in ROUGE_COLUMNS])

    out = {}
    for split in ("validation", "test"):
        scores = baseline_scores(_rows(os.path.join(data_dir, f"{split}.jsonl")), score)
        out[split] = {rule: dict(zip(ROUGE_COLUMNS, map(float, v))) for rule, v in scores.items()}
    return out


def summarize(records: list[dict]) -> list[dict]:
    """One row per system: the chosen learning rate's runs (all seeds) as mean and spread (max - min)."""
    rows = []
    for name in dict.fromkeys(r["system"] for r in records):
        runs = [r for r in records if r["system"] == name and r["chosen"]]
        mean = lambda f: statistics.fmean(f(r) for r in runs)
        spread = lambda f: max(f(r) for r in runs) - min(f(r) for r in runs)
        row = {"system": name, "seeds": len(runs), "learning_rate": runs[0]["learning_rate"],
               "trainable_params": runs[0]["trainable_params"],
               "trainable_percent": 100.0 * runs[0]["trainable_params"] / runs[0]["total_params"],
               "eval_loss": mean(lambda r: r["eval_loss"]), "validation_rougeL": mean(lambda r: r["validation"]["rougeL"]),
               "wall_s": mean(lambda r: r["train_wall_s"]), "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
               "sweep": {r["learning_rate"]: r["validation"]["rougeL"] for r in records if r["system"] == name and r["seed"] == 0}}
        for k in ROUGE_COLUMNS:
            row[k], row[k + "_spread"] = mean(lambda r: r["test"][k]), spread(lambda r: r["test"][k])
        rows.append(row)
    return rows


def _fmt(row: dict, k: str) -> str:
    return f"{row[k]:.2f}" + (f" ± {row[k + '_spread'] / 2:.2f}" if row["seeds"] > 1 else "")


def findings(rows: list[dict]) -> list[str]:
    """Plain statements read off the numbers: where LoRA falls short of full fine-tuning, where it catches up."""
    full = next((r for r in rows if r["system"] == "full"), None)
    lora = [r for r in rows if r["system"] != "full"]
    if full is None or not lora:
        return []
    out = []
    best = max(lora, key=lambda r: r["rougeL"])
    out.append(f"Full fine-tuning: test ROUGE-L {full['rougeL']:.2f}. Best LoRA row: {best['system']} with "
               f"{best['rougeL']:.2f} ({best['rougeL'] - full['rougeL']:+.2f}) training {best['trainable_percent']:.2f}% "
               "of the parameters.")
    for targets in ("qv", "attn"):
        series = sorted((r for r in lora if _is_lora_series(r, targets)), key=lambda r: r["trainable_params"])
        if not series:
            continue
        short = [r["system"] for r in series if r["rougeL"] < full["rougeL"] - 2.0]
        caught = next((r for r in series if r["rougeL"] >= full["rougeL"] - 2.0), None)
        where = "q,v" if targets == "qv" else "q,k,v,out"
        if caught is None:
            out.append(f"On {where}, no rank comes within 2 ROUGE-L points of full fine-tuning.")
        else:
            out.append(f"On {where}, the lowest rank within 2 ROUGE-L points of full fine-tuning is r={caught['system'].split('_')[1][1:]}"
                       f" ({caught['rougeL']:.2f}, {caught['trainable_percent']:.2f}% trainable)"
                       + (f"; below it, {', '.join(short)} fall short." if short else "; every rank does."))
    return out + variant_findings(rows, full)


def _is_lora_series(row: dict, targets: str) -> bool:
    return row["system"].startswith("lora_") and row["system"].endswith("_" + targets)


def variant_findings(rows: list[dict], full: dict) -> list[str]:
    """DoRA / PiSSA / OLoRA rows against plain LoRA of the same rank and targets and against full fine-tuning."""
    by_name = {r["system"]: r for r in rows}
    out = []
    for r in rows:
        name = r["system"]
        if name.startswith("lora_") or name == "full":
            continue
        plain = by_name.get("lora_" + name.split("_", 1)[1])
        versus = f", plain LoRA {plain['rougeL']:.2f} ({r['rougeL'] - plain['rougeL']:+.2f})" if plain else ""
        out.append(f"{name}: test ROUGE-L {r['rougeL']:.2f} at lr {r['learning_rate']:g}{versus}, full fine-tuning "
                   f"{full['rougeL']:.2f} ({r['rougeL'] - full['rougeL']:+.2f}).")
    return out


def plot(rows: list[dict], baselines: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for targets, label, marker in (("qv", "LoRA on q,v", "o"), ("attn", "LoRA on q,k,v,out", "s")):
        series = sorted((r for r in rows if _is_lora_series(r, targets)), key=lambda r: r["trainable_params"])
        if series:
            ax.plot([r["trainable_params"] for r in series], [r["rougeL"] for r in series], marker=marker, label=label)
            for r in series:
                ax.annotate(f"r={r['system'].split('_')[1][1:]}", (r["trainable_params"], r["rougeL"]), fontsize=7,
                            textcoords="offset points", xytext=(3, -9))
    for r, marker in zip([r for r in rows if not r["system"].startswith("lora_") and r["system"] != "full"], "^vDP"):
        ax.plot([r["trainable_params"]], [r["rougeL"]], marker, ms=8, label=r["system"].replace("_", " "))
    for r in rows:
        if r["system"] == "full":
            ax.errorbar([r["trainable_params"]], [r["rougeL"]], yerr=[r["rougeL_spread"] / 2], fmt="*", ms=12,
                        color="black", label="full fine-tuning")
    best_rule = max(baselines["test"].items(), key=lambda kv: kv[1]["rougeL"])
    ax.axhline(best_rule[1]["rougeL"], ls="--", color="grey", label=f"best trivial rule ({best_rule[0]})")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("test ROUGE-L")
    ax.set_title("Demo task: ROUGE-L vs trainable parameters")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(records: list[dict], out_dir: str, *, command: str, wall_s: float,
                 data_dir: str = "data/demo") -> str:
    """Writes QUALITY.md and the plot into out_dir; returns the markdown."""
    rows = summarize(records)
    baselines = baseline_table(data_dir)
    plot(rows, baselines, os.path.join(out_dir, PLOT_NAME))
    steps = records[0]["steps"] if records else 0
    lines = [
        "# Quality: LoRA vs full fine-tuning on the demo task",
        "",
        f"Made by `{command}` in {wall_s / 60:.0f} min on {platform.machine()} with {os.cpu_count()} CPU cores, "
        f"{datetime.date.today().isoformat()}. Task, base and code path: `configs/demo.yaml` (find and write a "
        "docstring's summary line among its shuffled-in lines, `data/demo`; base `data/demo_base`). Every run: "
        f"{steps} steps, batch and schedule as the demo; alpha = 2r; learning rate chosen per row by validation ROUGE-L "
        "from its sweep; scores are test-split ROUGE (beam search as the demo), mean ± half the spread over 3 seeds where "
        "seeds > 1. Wall time is the whole run (load, train, validation ROUGE); peak memory is the row's process RSS.",
        "",
        "| system | trainable params | eval loss | ROUGE-1 | ROUGE-2 | ROUGE-L | val ROUGE-L | lr (chosen) | seeds | wall time | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['system']} | {r['trainable_params']:,} ({r['trainable_percent']:.2f}%) | {r['eval_loss']:.3f} | "
                     f"{_fmt(r, 'rouge1')} | {_fmt(r, 'rouge2')} | **{_fmt(r, 'rougeL')}** | {r['validation_rougeL']:.2f} | "
                     f"{r['learning_rate']:g} | {r['seeds']} | {r['wall_s']:.0f} s | {r['peak_rss_bytes'] / 2**20:.0f} MiB |")
    for rule, s in baselines["test"].items():
        lines.append(f"| trivial: {rule} | — | — | {s['rouge1']:.2f} | {s['rouge2']:.2f} | {s['rougeL']:.2f} | "
                     f"{baselines['validation'][rule]['rougeL']:.2f} | — | — | — | — |")
    lines += ["", f"![ROUGE-L vs trainable parameters]({PLOT_NAME})", "", "## What the numbers say", ""]
    lines += [f"- {s}" for s in findings(rows)]
    lines += ["", "## Learning-rate sweeps (validation ROUGE-L, seed 0)", "", "| system | " + " | ".join(
        f"lr {lr:g}" for lr in sorted({lr for r in rows for lr in r["sweep"]})) + " |"]
    all_lrs = sorted({lr for r in rows for lr in r["sweep"]})
    lines.append("|---" * (len(all_lrs) + 1) + "|")
    for r in rows:
        lines.append(f"| {r['system']} | " + " | ".join(f"{r['sweep'][lr]:.2f}" if lr in r["sweep"] else "—" for lr in all_lrs) + " |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "QUALITY.md"), "w") as f:
        f.write(text)
    return text
