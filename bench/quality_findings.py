"""The plain reading of QUALITY.md's table: where LoRA matches full fine-tuning and at which rank, where not, the
issue's three goals (met or missed, with the numbers), and whether lora_jax lies inside PEFT's interval.

Rows are bench.quality_report.summarize's: "rougeL" (mean) with "rougeL_low" / "rougeL_high" (95% interval)."""

from __future__ import annotations

MATCH_POINTS = 1.0  # "within 1 ROUGE-L point of full fine-tuning" (the goal)
BASELINE_MARGIN = 5.0  # the best LoRA row at least this far above the best baseline


def overlaps(a: dict, b: dict, k: str = "rougeL") -> bool:
    return a[k + "_low"] <= b[k + "_high"] and b[k + "_low"] <= a[k + "_high"]


def matches_full(row: dict, full: dict) -> bool:
    """The goal's test: within 1 ROUGE-L point of full fine-tuning, or its mean inside full's interval."""
    return abs(row["rougeL"] - full["rougeL"]) <= MATCH_POINTS or full["rougeL_low"] <= row["rougeL"] <= full["rougeL_high"]


def _series(rows: list[dict], suffix: str) -> list[dict]:
    return sorted((r for r in rows if r["system"].startswith("lora_") and r["system"].endswith(suffix)),
                  key=lambda r: r["rank"])


def rank_findings(rows: list[dict], full: dict) -> list[str]:
    out = []
    for suffix, where in (("_qv", "q,v"), ("_all", "every linear layer")):
        series = _series(rows, suffix)
        if not series:
            continue
        matched = [r for r in series if matches_full(r, full)]
        overlapping = [r for r in series if overlaps(r, full)]
        short = [f"r={r['rank']} ({r['rougeL']:.2f})" for r in series if not overlaps(r, full)]
        if matched:
            first = matched[0]
            out.append(f"LoRA on {where}: from r={first['rank']} ({first['rougeL']:.2f}, {first['trainable_percent']:.2f}% "
                       f"of the parameters) it is within {MATCH_POINTS:g} ROUGE-L point of full fine-tuning or inside its "
                       f"interval; ranks whose interval overlaps full's: {', '.join(str(r['rank']) for r in overlapping) or 'none'}"
                       + (f"; intervals apart from full's: {', '.join(short)}." if short else "."))
        else:
            out.append(f"LoRA on {where}: no rank matches full fine-tuning (best r={max(series, key=lambda r: r['rougeL'])['rank']}"
                       f", {max(r['rougeL'] for r in series):.2f})" + (f"; intervals apart: {', '.join(short)}." if short else "."))
    return out


def goal_findings(rows: list[dict], full: dict | None, baselines: dict) -> list[str]:
    out = []
    lora = [r for r in rows if r["system"].startswith("lora_") and r["rank"] <= 16]
    if full is not None and lora:
        matched = [r for r in lora if matches_full(r, full)]
        out.append(("Goal met" if matched else "Goal missed") + f": LoRA (r <= 16) within {MATCH_POINTS:g} ROUGE-L point of "
                   f"full fine-tuning ({full['rougeL']:.2f}) or inside its interval: "
                   + (", ".join(r["system"] for r in matched) if matched else "no row") + ".")
    if lora and baselines.get("test"):
        best = max(lora, key=lambda r: r["rougeL"])
        name, base = max(baselines["test"].items(), key=lambda kv: kv[1]["rougeL"])
        gap = best["rougeL"] - base["rougeL"]
        out.append(("Goal met" if gap >= BASELINE_MARGIN else "Goal missed") + f": best LoRA row {best['system']} "
                   f"{best['rougeL']:.2f} is {gap:+.2f} ROUGE-L from the best baseline ({name}, {base['rougeL']:.2f}); "
                   f"the goal is +{BASELINE_MARGIN:g}.")
    peft = next((r for r in rows if r["mode"] == "peft"), None)
    mirror = next((r for r in lora if peft and r["rank"] == peft["rank"] and r["targets"] == peft["targets"]), None)
    if peft is not None and mirror is not None:
        inside = peft["rougeL_low"] <= mirror["rougeL"] <= peft["rougeL_high"]
        out.append(("Goal met" if inside else "Goal missed") + f": lora_jax {mirror['system']} {mirror['rougeL']:.2f} is "
                   f"{'inside' if inside else 'outside'} PEFT's interval {peft['rougeL']:.2f} [{peft['rougeL_low']:.2f}, "
                   f"{peft['rougeL_high']:.2f}] (same base, recipe, data order and generation); wall time "
                   f"{mirror['wall_s']:.0f} s vs {peft['wall_s']:.0f} s.")
    elif lora:
        out.append("Not measured: the PEFT row (it needs torch and peft: pip install 'lora_jax[torch]', or pass "
                   "--torch-python).")
    return out


def variant_findings(rows: list[dict], full: dict | None) -> list[str]:
    """DoRA / PiSSA against plain LoRA of the same rank and targets and against full fine-tuning."""
    out = []
    for r in rows:
        if r["mode"] != "lora" or r["system"].startswith("lora_"):
            continue
        plain = next((p for p in rows if p["system"].startswith("lora_") and p["rank"] == r["rank"]
                      and p["targets"] == r["targets"]), None)
        versus = f"; plain LoRA {plain['rougeL']:.2f} ({r['rougeL'] - plain['rougeL']:+.2f}, intervals " \
                 f"{'overlap' if overlaps(r, plain) else 'apart'})" if plain else ""
        vs_full = f"; full fine-tuning {full['rougeL']:.2f} ({r['rougeL'] - full['rougeL']:+.2f})" if full else ""
        out.append(f"{r['system']} (r={r['rank']}): test ROUGE-L {r['rougeL']:.2f} at lr {r['learning_rate']:g}{versus}{vs_full}.")
    return out


def findings(rows: list[dict], baselines: dict) -> list[str]:
    full = next((r for r in rows if r["mode"] == "full"), None)
    out = []
    if full is not None:
        out.append(f"Full fine-tuning: test ROUGE-L {full['rougeL']:.2f} [{full['rougeL_low']:.2f}, {full['rougeL_high']:.2f}].")
        out += rank_findings(rows, full)
    out += goal_findings(rows, full, baselines) + variant_findings(rows, full)
    edges = [r["system"] for r in rows if r["edge"]]
    if edges:
        out.append(f"Learning rate at the edge of its (extended) sweep: {', '.join(edges)}: a wider sweep might do better.")
    return out
