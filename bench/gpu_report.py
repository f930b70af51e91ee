"""From `python -m bench.gpu`'s child records to its summary (checks, training and generation rows, issue 25's GPU
target) and its markdown report."""

from __future__ import annotations

from typing import Any, Mapping

from bench.report import _fmt, _mib, _table, mfu, xla_gflops

LORA_OVER_PEFT_GOAL = 1.5  # issue 25: LoRA tokens/s >= 1.5x PEFT's on the same GPU at a batch that fills it


def _by_section(records: list[Mapping[str, Any]]) -> dict[str, dict[str, Mapping[str, Any]]]:
    sections: dict[str, dict[str, Mapping[str, Any]]] = {}
    for record in records:
        sections.setdefault(record["section"], {})[record["system"]] = record
    return sections


def train_tokens_per_s(record: Mapping[str, Any]) -> float | None:
    """Source plus target tokens trained on per second: batch x (source_len + target_len) / median step."""
    step = record.get("step_time_s")
    if record.get("status") != "ok" or not step:
        return None
    return record["batch"] * (record["source_len"] + record["target_len"]) / step


def _ok(section: Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {name: r for name, r in section.items() if r.get("status") == "ok"}


def train_rows(section: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    ok = _ok(section)
    rows = []
    for name, r in section.items():
        if r.get("kind") != "train":
            continue
        rows.append({"system": name, "model": r.get("model"), "batch": r.get("batch"),
                     "tokens_per_s": train_tokens_per_s(r), "step_time_s": r.get("step_time_s"),
                     "peak_memory_bytes": r.get("peak_memory_bytes"), "memory_kind": r.get("memory_kind"),
                     "xla_gflops_per_s": xla_gflops(ok, name), "mfu": mfu(ok, name), "compile_s": r.get("compile_s"),
                     "first_step_s": r.get("first_step_s"), "first_loss": r.get("first_loss"),
                     "attn_implementation": r.get("attn_implementation")})
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def gpu_summary(records: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Checks, per-section rows and ratios, the GPU target, what failed and what was skipped; `ok` is True when
    every check passed and no child failed (skips for the time budget are reported, not failures)."""
    sections = _by_section(records)
    checks_record = sections.get("checks", {}).get("gpu_checks", {})
    checks = checks_record.get("checks", [])
    training, targets = {}, []
    for name, section in sections.items():
        if not name.startswith("train"):
            continue
        rows = train_rows(section)
        speed = {row["system"]: row["tokens_per_s"] for row in rows}
        ratio = _ratio(speed.get("jax_lora"), speed.get("peft_lora"))
        training[name] = {"rows": rows, "lora_over_peft_tokens_per_s": ratio,
                          "full_over_torch_full_tokens_per_s": _ratio(speed.get("jax_full"), speed.get("torch_full"))}
        status = "n/a" if ratio is None else ("met" if ratio >= LORA_OVER_PEFT_GOAL else "missed")
        targets.append({"target": f"LoRA tokens/s / PEFT LoRA tokens/s ({name})", "value": ratio,
                        "goal": f">= {LORA_OVER_PEFT_GOAL:g}", "status": status})
    generation = {}
    for name, section in sections.items():
        if name.startswith("generate"):
            jax_r, torch_r = section.get("jax_generate", {}), section.get("torch_generate", {})
            same = jax_r["ids_digest"] == torch_r["ids_digest"] if "ids_digest" in jax_r and "ids_digest" in torch_r else None
            generation[name] = {"jax_tokens_per_s": jax_r.get("tokens_per_s"), "torch_tokens_per_s": torch_r.get("tokens_per_s"),
                                "jax_over_torch": _ratio(jax_r.get("tokens_per_s"), torch_r.get("tokens_per_s")),
                                "ids_identical": same, "jax_compile_s": jax_r.get("compile_s"),
                                "jax_peak_memory_bytes": jax_r.get("peak_memory_bytes"),
                                "torch_peak_memory_bytes": torch_r.get("peak_memory_bytes")}
    errors = [{"section": r["section"], "system": r["system"], "reason": r.get("reason")} for r in records
              if r.get("status") == "error"]
    skipped = [{"section": r["section"], "system": r["system"], "reason": r.get("reason")} for r in records
               if r.get("status") == "skipped"]
    failed_checks = [c["name"] for c in checks if c["status"] == "fail"]
    checks_ran = checks_record.get("status") == "ok"
    return {"checks": checks, "checks_passed": checks_ran and not failed_checks, "failed_checks": failed_checks,
            "training": training, "generation": generation, "targets": targets, "errors": errors, "skipped": skipped,
            "ok": checks_ran and not failed_checks and not errors}


def checks_table(checks: list[Mapping[str, Any]]) -> str:
    rows = [[c["name"], c["status"], _fmt(c["value"]), c["tolerance"], c.get("detail", "")] for c in checks]
    return _table(["check", "status", "measured", "tolerance", "detail"], rows)


def training_table(training: Mapping[str, Any]) -> str:
    rows = []
    for section, entry in training.items():
        for row in entry["rows"]:
            rows.append([section, row["system"], _fmt(row["batch"]), _fmt(row["tokens_per_s"]), _fmt(row["step_time_s"]),
                         _mib(row["peak_memory_bytes"]) + (" (RSS)" if row["memory_kind"] == "rss" else ""),
                         _fmt(row["mfu"]), _fmt(row["compile_s"]), _fmt(row["first_loss"], 5)])
    return _table(["section", "system", "batch", "tokens/s", "step s", "peak MiB", "MFU (bf16 peak)", "compile s",
                   "first loss"], rows)


def generation_table(generation: Mapping[str, Any]) -> str:
    rows = [[name, _fmt(g["jax_tokens_per_s"]), _fmt(g["torch_tokens_per_s"]), _fmt(g["jax_over_torch"]),
             _fmt(g["ids_identical"]), _fmt(g["jax_compile_s"]), _mib(g["jax_peak_memory_bytes"]),
             _mib(g["torch_peak_memory_bytes"])] for name, g in generation.items()]
    return _table(["section", "lora_jax tokens/s", "transformers tokens/s", "ratio", "ids identical", "lora_jax compile s",
                   "lora_jax peak MiB", "torch peak MiB"], rows)


def gpu_markdown(result: Mapping[str, Any]) -> str:
    env, summary = result["environment"], result["summary"]
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v)
    parts = ["### GPU check" + (" (DRY RUN on the CPU: no GPU numbers)" if env.get("dry_run") else ""),
             f"Command: `{env.get('command')}`; {env.get('date_utc')} UTC; {result['wall_s']:.0f} s",
             f"GPU: {env.get('gpu') or 'none reported by nvidia-smi'}; JAX backend {env.get('jax_backend')}; "
             f"CPU {env.get('cpu')} ({env.get('cores')} cores); versions: {versions}",
             "#### Checks (GPU vs the CPU reference)", checks_table(summary["checks"]) if summary["checks"] else "not run",
             "#### Training (tokens/s = batch x (source + target) / median step)", training_table(summary["training"]),
             "#### 4-beam generation", generation_table(summary["generation"]),
             "#### Targets", _table(["target", "measured", "goal", "status"],
                                    [[t["target"], _fmt(t["value"]), t["goal"], t["status"]] for t in summary["targets"]])]
    for kind in ("errors", "skipped"):
        if summary[kind]:
            parts.append(f"{kind.capitalize()}: " + "; ".join(f"{e['section']} / {e['system']} ({e['reason']})"
                                                               for e in summary[kind]))
    parts.append("Overall: " + ("OK" if summary["ok"] else "FAILED (see checks and errors)"))
    return "\n\n".join(parts)
