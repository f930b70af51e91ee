"""The table of LoRA on a lighter frozen base (bench/jax_precision.py's systems against `jax_lora` and `jax_full` of
the same run): step time, peak memory and first loss of each base storage, as ratios to the float32 rows."""

from __future__ import annotations

from typing import Any, Mapping

Records = Mapping[str, Mapping[str, Any]]
PRECISION_SYSTEMS = ("jax_lora_bf16", "jax_lora_int8", "jax_lora_nf4", "jax_generate_int8")
ROWS = (("jax_lora", "float32"), ("jax_lora_bf16", "bfloat16 (float32 compute)"), ("jax_lora_int8", "int8 kernels + token embeddings"),
        ("jax_lora_nf4", "NF4 kernels"))


def _num(value: Any, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _ratio(a: Any, b: Any) -> float | None:
    return None if a is None or not b else a / b


def precision_table(records: Records) -> str:
    """Markdown: one row per base storage, then the int8-base generation speed against the float32 base's."""
    fp32, full = records.get("jax_lora", {}), records.get("jax_full", {})
    header = ["system", "frozen base", "base MiB", "step s (median)", "÷ fp32 LoRA step", "peak MiB", "÷ fp32 LoRA peak",
              "÷ full FT peak", "steady peak MiB", "first loss", "first loss − fp32's"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for system, what in ROWS:
        r = records.get(system)
        if r is None:
            continue
        peak, loss = r.get("peak_memory_bytes"), r.get("first_loss")
        delta = None if loss is None or fp32.get("first_loss") is None else loss - fp32["first_loss"]
        cells = [system, what, _num(_base_mib(r), ",.1f"),
                 _num(r.get("step_time_s"), ".3g"), _num(_ratio(r.get("step_time_s"), fp32.get("step_time_s")), ".3f"),
                 _num(None if peak is None else peak / 2**20, ",.0f"), _num(_ratio(peak, fp32.get("peak_memory_bytes")), ".3f"),
                 _num(_ratio(peak, full.get("peak_memory_bytes")), ".3f"),
                 _num(None if r.get("steady_peak_rss_bytes") is None else r["steady_peak_rss_bytes"] / 2**20, ",.0f"),
                 _num(loss, ".5f"), _num(delta, "+.5f")]
        lines.append("| " + " | ".join(cells) + " |")
    gen, gen32 = records.get("jax_generate_int8"), records.get("jax_generate")
    if gen:
        ratio = _ratio(gen.get("tokens_per_s"), (gen32 or {}).get("tokens_per_s"))
        lines.append(f"\n4-beam search on the int8 base: {_num(gen.get('tokens_per_s'), '.3g')} tokens/s "
                     f"({_num(ratio, '.3f')}x the float32 base's), ids identical to the float32 base's: "
                     f"{_same_ids(gen, gen32)}")
    return "\n".join(lines)


def _base_mib(r: Mapping[str, Any]) -> float | None:
    """MiB of the frozen base as stored; for the float32 row, 4 bytes per frozen parameter."""
    if r.get("base_bytes") is not None:
        return r["base_bytes"] / 2**20
    if r.get("total_params") is None or r.get("trainable_params") is None:
        return None
    return 4 * (r["total_params"] - r["trainable_params"]) / 2**20


def _same_ids(a: Mapping[str, Any], b: Mapping[str, Any] | None) -> str:
    if not b or "ids_digest" not in a or "ids_digest" not in b:
        return "—"
    return "yes" if a["ids_digest"] == b["ids_digest"] else "no"
