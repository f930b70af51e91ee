"""QUALITY.md and its plot from bench.quality's records (one JSON record per system, learning rate and seed)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics

from bench.quality_findings import findings
from bench.quality_rouge import ROUGE_COLUMNS, baseline_table, interval_of_mean

PLOT_NAME = "quality_rouge_vs_params.png"


def summarize(records: list[dict]) -> list[dict]:
    """One row per system: its chosen learning rate's runs (all seeds). Test ROUGE = the seed-averaged mean with the
    95% bootstrap interval of that mean over test examples; `*_spread` = max - min over seeds."""
    rows = []
    for name in dict.fromkeys(r["system"] for r in records):
        runs = [r for r in records if r["system"] == name and r["chosen"]]
        first = runs[0]
        row = {"system": name, "mode": first.get("mode"), "rank": first.get("rank"), "targets": first.get("targets"),
               "seeds": len(runs), "learning_rate": first["learning_rate"], "edge": first.get("edge", False),
               "trainable_params": first["trainable_params"],
               "trainable_percent": 100.0 * first["trainable_params"] / first["total_params"],
               "eval_loss": statistics.fmean(r["eval_loss"] for r in runs),
               "validation_rougeL": statistics.fmean(r["validation"]["rougeL"] for r in runs),
               "wall_s": statistics.fmean(r["train_wall_s"] for r in runs),
               "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
               "samples": first.get("test_samples", []),
               "sweep": {r["learning_rate"]: r["validation"]["rougeL"] for r in records if r["system"] == name and r["seed"] == 0}}
        interval = interval_of_mean([r["test_per_example"] for r in runs])
        for k in ROUGE_COLUMNS:
            row[k], row[k + "_low"], row[k + "_high"] = interval[k], interval[k + "_low"], interval[k + "_high"]
            row[k + "_spread"] = max(r["test"][k] for r in runs) - min(r["test"][k] for r in runs)
        rows.append(row)
    return rows


def _ci(s: dict, k: str) -> str:
    return f"{s[k]:.2f} [{s[k + '_low']:.2f}, {s[k + '_high']:.2f}]"


def _label(row: dict) -> str:
    if row["mode"] == "full":
        return "full fine-tuning"
    targets = "q,v" if row["targets"] == ["q_proj", "v_proj"] else "all linear" if len(row["targets"] or []) == 6 else ",".join(row["targets"])
    return f"r={row['rank']}, {targets}"


def plot(rows: list[dict], baselines: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def bars(series):
        return [[r["rougeL"] - r["rougeL_low"] for r in series], [r["rougeL_high"] - r["rougeL"] for r in series]]

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for suffix, label, marker in (("_qv", "LoRA on q,v", "o"), ("_all", "LoRA on every linear layer", "s")):
        series = sorted((r for r in rows if r["system"].startswith("lora_") and r["system"].endswith(suffix)),
                        key=lambda r: r["trainable_params"])
        if series:
            ax.errorbar([r["trainable_params"] for r in series], [r["rougeL"] for r in series], yerr=bars(series),
                        marker=marker, capsize=3, label=label)
            for r in series:
                ax.annotate(f"r={r['rank']}", (r["trainable_params"], r["rougeL"]), fontsize=7,
                            textcoords="offset points", xytext=(4, -10))
    others = [r for r in rows if not r["system"].startswith("lora_")]
    for r, marker in zip(others, "*^vDPX"):
        ax.errorbar([r["trainable_params"]], [r["rougeL"]], yerr=bars([r]), fmt=marker, ms=10, capsize=3,
                    label=r["system"] if r["mode"] != "full" else "full fine-tuning")
    best_name, best = max(baselines["test"].items(), key=lambda kv: kv[1]["rougeL"])
    ax.axhline(best["rougeL"], ls="--", color="grey", label=f"best baseline ({best_name})")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("test ROUGE-L (95% interval)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _data_lines(data_dir: str) -> list[str]:
    path = os.path.join(data_dir, "info.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        info = json.load(f)
    dates = "; ".join(f"{i['file'].split('_dists_')[-1].split('_main')[0]} {i['date']}" for i in info["index"])
    return [f"Data: `{os.path.relpath(data_dir)}` ({info['train']:,} train / {info['validation']:,} validation / {info['test']:,} test "
            f"rows; index dates: {dates}). Validation and test descriptions were never in the base's pre-training "
            f"corpus; they are shorter than train's (mean source {info['mean_source_words']['test']:.0f} vs "
            f"{info['mean_source_words']['train']:.0f} words), which the baselines on a train sample below measure."]


def _table(rows: list[dict], baselines: dict) -> list[str]:
    lines = ["| system | rank, targets | trainable params | ROUGE-1 | ROUGE-2 | ROUGE-L | val ROUGE-L | lr (chosen) | seeds "
             "| wall time | peak RSS |", "|---" * 11 + "|"]
    for r in rows:
        edge = " (edge)" if r["edge"] else ""
        lines.append(f"| {r['system']} | {_label(r)} | {r['trainable_params']:,} ({r['trainable_percent']:.2f}%) | "
                     f"{_ci(r, 'rouge1')} | {_ci(r, 'rouge2')} | **{_ci(r, 'rougeL')}** | {r['validation_rougeL']:.2f} | "
                     f"{r['learning_rate']:g}{edge} | {r['seeds']} | {r['wall_s']:.0f} s | {r['peak_rss_bytes'] / 2**20:.0f} MiB |")
    for name, s in baselines["test"].items():
        val = baselines["validation"].get(name, {}).get("rougeL")
        lines.append(f"| baseline: {name} | — | — | {_ci(s, 'rouge1')} | {_ci(s, 'rouge2')} | {_ci(s, 'rougeL')} | "
                     f"{val:.2f} | — | — | — | — |" if val is not None else "| — |")
    return lines


def _sweep_lines(rows: list[dict]) -> list[str]:
    lrs = sorted({lr for r in rows for lr in r["sweep"]})
    lines = ["| system | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---" * (len(lrs) + 1) + "|"]
    for r in rows:
        cells = [(f"**{r['sweep'][lr]:.2f}**" if lr == r["learning_rate"] else f"{r['sweep'][lr]:.2f}")
                 if lr in r["sweep"] else "—" for lr in lrs]
        lines.append(f"| {r['system']} | " + " | ".join(cells) + " |")
    return lines


def write_report(records: list[dict], out_dir: str, *, command: str, wall_s: float, config: str,
                 quick: bool = False, baselines: dict | None = None, jobs: int = 1) -> str:
    """Writes QUALITY.md and the plot into out_dir; returns the markdown. baselines: bench.quality_rouge's
    baseline_table (computed here from the config's data when None; quick: rules only, on 32 rows)."""
    from train.config import load_config

    cfg = load_config(config)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data_dir = os.path.join(repo, os.path.dirname(cfg.data.test_files))  # relative paths are the repository's
    if baselines is None:
        baselines = baseline_table(data_dir, config=None if quick else config, max_rows=32 if quick else None)
    rows = summarize(records)
    plot(rows, baselines, os.path.join(out_dir, PLOT_NAME), f"{os.path.basename(config)}: ROUGE-L vs trainable parameters")
    steps = records[0]["steps"] if records else 0
    lines = [
        "# Quality: LoRA vs full fine-tuning vs PEFT on the synopsis task",
        "",
        f"Made by `{command}` in {wall_s / 60:.0f} min on {platform.machine()} with {os.cpu_count()} CPU cores, "
        f"{datetime.date.today().isoformat()}." + (" **Quick smoke run: not a measurement.**" if quick else ""),
        "",
        f"Task, base and code path: `{os.path.relpath(config)}` (source: a Debian package's name and extended description;"
        " target: its one-line synopsis; base `data/demo_base`). Every run: "
        f"{steps} steps, batch and schedule as the config; alpha = 2r; the learning rate is chosen per row by validation "
        "ROUGE-L from a sweep extended past any edge pick (`(edge)` marks a row whose best rate is still an end of its "
        "sweep). Scores: test ROUGE F-measure x 100, beam search as the config; for rows with several seeds, the mean "
        "over seeds. Brackets: 95% bootstrap interval of that mean over test examples (rouge-score's "
        "BootstrapAggregator, 1000 resamples). Wall time: the whole run (load, train, validation ROUGE), mean over seeds"
        + (f", with {jobs} rows training side by side, each pinned to its own share of the cores" if jobs > 1 else "")
        + "; peak memory: the row's process RSS.",
        "",
        *_data_lines(data_dir),
        "",
        *_table(rows, baselines),
        "",
        f"![ROUGE-L vs trainable parameters]({PLOT_NAME})",
        "",
        "## What the numbers say",
        "",
        *[f"- {s}" for s in findings(rows, baselines)],
        "",
        "## Learning-rate sweeps (validation ROUGE-L, seed 0; bold: chosen)",
        "",
        *_sweep_lines(rows),
    ]
    if "train sample" in baselines:
        lines += ["", "## Baselines on a train sample (descriptions the base saw in pre-training)", "",
                  "| baseline | ROUGE-L train sample | ROUGE-L test |", "|---|---|---|"]
        lines += [f"| {k} | {_ci(s, 'rougeL')} | {_ci(baselines['test'][k], 'rougeL')} |"
                  for k, s in baselines["train sample"].items() if k in baselines["test"]]
    best = max((r for r in rows if r["samples"]), key=lambda r: r["rougeL"], default=None)
    if best is not None:
        lines += ["", f"## Test samples ({best['system']})", ""]
        lines += [f"- prediction: {s['prediction']!r} / reference: {s['reference']!r}" for s in best["samples"]]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "QUALITY.md"), "w") as f:
        f.write(text)
    return text
