"""Many adapters, one base, one batch: mixed-adapter forward and beam search against the alternatives (issue 16).

    python -m bench.multi_adapter                                   # data/demo_base, K = 4 and 16, batch 16, 4 beams
    python -m bench.multi_adapter --torch-python /path/to/venv/bin/python   # adds PEFT's mixed-batch generate
    python -m bench.multi_adapter --model base                      # bart-base size, random weights and tokens

For each K: K random adapters (LoRA r --rank on q_proj and v_proj, non-zero A and B, as after training), a batch of
--batch real docstrings (data/demo test split; with --model, seeded random tokens) whose rows cycle through the
adapters. Measured, all in this process
(the PEFT row in a child process that never imports JAX):

- forward (logits of the batch, jitted, median of --repeats calls timed round-robin): the base; one adapter merged
  (W + sAB: the plain model's cost); the mixed batch through MultiLoraModel, gathered and grouped. The per-example
  overhead is mixed / merged - 1.
- beam search (tokens/s, median of --gen-repeats calls timed round-robin; every row decodes exactly --max-new-tokens tokens: EOS is blocked by min_length, so all
  systems do the same work): (a) the base alone; (b) each adapter's rows as a separate call on that adapter's merged
  weights, one after another, merging included; the mixed batch in one `generate(..., adapter_ids=)` call (gathered
  and grouped); (c) PEFT's `generate(adapter_names=...)` on the same weights and rows, when --torch-python has torch,
  PEFT and transformers 4.x.
- memory: bytes of the weights each approach keeps (base, stack of K adapters, a merged copy) and the process's peak
  RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax
from bench.common import interleaved_median_times
from lora_jax.generation import GenerationConfig
from lora_jax.lora.multi import MultiLoraModel
from lora_jax.lora.stack import stack_adapters
from lora_jax.tree import flatten_tree, tree_bytes, unflatten_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_adapters(base, k: int, rank: int, seed: int):
    """K adapters with non-zero A and B (std 0.02 B), named a0..a{K-1}."""
    config = lora_jax.LoraConfig(rank=rank, alpha=2.0 * rank, targets=("q_proj", "v_proj"))
    adapters = {}
    for i in range(k):
        flat = flatten_tree(lora_jax.adapter_params(lora_jax.init_lora(base, config, jax.random.PRNGKey(seed + i))))
        rng = np.random.default_rng(seed + 1000 + i)
        adapters[f"a{i}"] = unflatten_tree({p: (0.02 * rng.standard_normal(v.shape)).astype(np.float32)
                                            if p[-1] == "lora_b" else v for p, v in flat.items()})
    return adapters, {n: config for n in adapters}


def load_batch(tokenizer, batch: int, source_len: int):
    rows = [json.loads(line) for line in open(os.path.join(ROOT, "data", "demo", "test.jsonl"))][:batch]
    enc = tokenizer([r["source"] for r in rows], truncation=True, max_length=source_len, padding="max_length",
                    return_tensors="np")
    return jnp.asarray(enc["input_ids"], jnp.int32), jnp.asarray(enc["attention_mask"], jnp.int32)


def fixed_length_config(model, beams: int, new_tokens: int) -> GenerationConfig:
    c = model.config
    return GenerationConfig(num_beams=beams, max_new_tokens=new_tokens, min_length=new_tokens + 1, length_penalty=1.0,
                            no_repeat_ngram_size=0, early_stopping=False, forced_bos_token_id=None,
                            forced_eos_token_id=None, decoder_start_token_id=c.decoder_start_token_id,
                            eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)


def bench_forward(model, base, stacked, info, merged_one, input_ids, mask, ids, repeats: int) -> dict:
    """Median seconds of the forward variants, timed round-robin."""
    decoder_ids = input_ids[:, :32]
    plain = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    mixed = {m: jax.jit(lambda p, i, *a, m=m: MultiLoraModel(model, info, m).apply({"params": p}, *a, adapter_ids=i))
             for m in ("gather", "grouped")}
    params = lora_jax.combine(base, stacked)
    args = (input_ids, mask, decoder_ids)
    runs = {
        "base": lambda: plain(base, *args).block_until_ready(),
        "merged": lambda: plain(merged_one, *args).block_until_ready(),
        "mixed_gather": lambda: mixed["gather"](params, ids, *args).block_until_ready(),
        "mixed_grouped": lambda: mixed["grouped"](params, ids, *args).block_until_ready(),
    }
    for run in runs.values():
        run()  # compile
    t = interleaved_median_times(runs, repeats)
    return {f"forward_{k}_s": v for k, v in t.items()} | {
        "forward_overhead_gather": t["mixed_gather"] / t["merged"] - 1,
        "forward_overhead_grouped": t["mixed_grouped"] / t["merged"] - 1}


def sequential_merged(model, base, adapters, configs, input_ids, mask, names, cfg):
    """(b): each adapter's rows as one call on its merged weights, one after another (merging included)."""
    outputs = {}
    for name in adapters:
        rows = np.array([i for i, n in enumerate(names) if n == name])
        merged = lora_jax.merge_lora(lora_jax.combine(base, adapters[name]), configs[name])
        outputs[name] = np.asarray(lora_jax.generate_padded(model, merged, input_ids[rows], mask[rows],
                                                            generation_config=cfg))
    return outputs


def bench_generate(model, base, adapters, configs, stacked, info, input_ids, mask, names, cfg, repeats: int) -> dict:
    params = lora_jax.combine(base, stacked)
    ids = jnp.asarray(info.ids(names))
    tokens = input_ids.shape[0] * cfg.max_new_tokens
    runs = {
        "base": lambda: np.asarray(lora_jax.generate_padded(model, base, input_ids, mask, generation_config=cfg)),
        "sequential_merged": lambda: sequential_merged(model, base, adapters, configs, input_ids, mask, names, cfg),
    }
    for method in ("gather", "grouped"):
        multi = MultiLoraModel(model, info, method)
        runs[f"mixed_{method}"] = lambda multi=multi: np.asarray(lora_jax.generate_padded(
            multi, params, input_ids, mask, adapter_ids=ids, generation_config=cfg))
    for run in runs.values():
        run()  # compile every shape first
    # Round-robin, so the load swings of a shared machine hit every system alike.
    out = {f"generate_{name}_tok_s": tokens / s for name, s in interleaved_median_times(runs, repeats).items()}
    mixed, seq = runs["mixed_gather"](), runs["sequential_merged"]()
    out["mixed_equals_sequential"] = all(
        np.array_equal(mixed[[i for i, n in enumerate(names) if n == a]], seq[a]) for a in adapters)
    out["mixed_over_sequential"] = out["generate_mixed_gather_tok_s"] / out["generate_sequential_merged_tok_s"]
    return out


def peft_row(torch_python: str, base_dir: str, adapters, configs, base, input_ids, mask, names, cfg, repeats) -> dict:
    """(c) in a child process: PEFT's mixed-batch generate on the same weights and rows."""
    from lora_jax.checkpoints.peft import export_peft

    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for name in adapters:
            dirs[name] = export_peft(os.path.join(tmp, name), lora_jax.combine(base, adapters[name]), configs[name],
                                     base_dir)
        spec = dict(base=base_dir, adapters=dirs, input_ids=np.asarray(input_ids).tolist(),
                    attention_mask=np.asarray(mask).tolist(), names=names, num_beams=cfg.num_beams,
                    max_new_tokens=cfg.max_new_tokens, repeats=repeats)
        with open(os.path.join(tmp, "spec.json"), "w") as f:
            json.dump(spec, f)
        proc = subprocess.run([torch_python, "-m", "bench.multi_adapter_torch", os.path.join(tmp, "spec.json")],
                              cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {"peft": "skipped", "peft_reason": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def random_inputs(batch: int, source_len: int, model: str, seed: int):
    """--model base: the seeded uniform tokens of bench.common.make_batch (no padding), as the training benches use."""
    from bench.common import BenchSpec, make_batch

    b = make_batch(BenchSpec(model=model, batch=batch, source_len=source_len, target_len=2, seed=seed))
    return jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"])


def run_k(args, model, base, tokenizer, k: int) -> dict:
    adapters, configs = make_adapters(base, k, args.rank, args.seed)
    stacked, info = stack_adapters(adapters, configs)
    if tokenizer is None:
        input_ids, mask = random_inputs(args.batch, args.source_len, args.model, args.seed)
    else:
        input_ids, mask = load_batch(tokenizer, args.batch, args.source_len)
    names = [f"a{i % k}" for i in range(args.batch)]
    ids = jnp.asarray(info.ids(names))
    merged_one = lora_jax.merge_lora(lora_jax.combine(base, adapters["a0"]), configs["a0"])
    cfg = fixed_length_config(model, args.num_beams, args.max_new_tokens)
    record = {"K": k, "model": args.model or "demo_base", "batch": args.batch, "num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens,
              "source_len": args.source_len, "rank": args.rank,
              "base_bytes": tree_bytes(base), "stack_bytes": tree_bytes(stacked), "merged_copy_bytes": tree_bytes(base)}
    record |= bench_forward(model, base, stacked, info, merged_one, input_ids, mask, ids, args.repeats)
    record |= bench_generate(model, base, adapters, configs, stacked, info, input_ids, mask, names, cfg,
                             args.gen_repeats)
    record["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # this process, all so far
    if args.torch_python:
        record |= peft_row(args.torch_python, args.base, adapters, configs, base, input_ids, mask, names, cfg,
                           args.peft_repeats)
    return record


def markdown(records) -> str:
    lines = ["| K | forward: merged ms | mixed gather ms (overhead) | mixed grouped ms (overhead) | generate tok/s: "
             "base (a) | sequential merged (b) | mixed gather | mixed grouped | PEFT mixed (c) | mixed / (b) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        peft = f"{r['peft_tok_s']:.0f}" if "peft_tok_s" in r else r.get("peft", "not run")
        lines.append(
            f"| {r['K']} | {1e3 * r['forward_merged_s']:.1f} | {1e3 * r['forward_mixed_gather_s']:.1f} "
            f"({100 * r['forward_overhead_gather']:+.0f}%) | {1e3 * r['forward_mixed_grouped_s']:.1f} "
            f"({100 * r['forward_overhead_grouped']:+.0f}%) | {r['generate_base_tok_s']:.0f} | "
            f"{r['generate_sequential_merged_tok_s']:.0f} | {r['generate_mixed_gather_tok_s']:.0f} | "
            f"{r['generate_mixed_grouped_tok_s']:.0f} | {peft} | {r['mixed_over_sequential']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.multi_adapter", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=os.path.join(ROOT, "data", "demo_base"))
    ap.add_argument("--model", choices=["tiny", "base"],
                    help="instead of --base: seeded random weights of this size (base = facebook/bart-base's "
                         "architecture) and seeded random tokens, as in python -m bench.run")
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--num-beams", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--source-len", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20, help="forward calls per variant")
    ap.add_argument("--gen-repeats", type=int, default=5, help="timed generate calls per system (round-robin)")
    ap.add_argument("--peft-repeats", type=int, default=1, help="timed PEFT generate calls (after one warm-up)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch-python", help="a python with torch, peft and transformers 4.x, for the PEFT row")
    args = ap.parse_args(argv)
    if args.model is None:
        model, base = lora_jax.load_pretrained(args.base)
        tokenizer = lora_jax.load_tokenizer(args.base)
    else:
        if args.torch_python:
            ap.error("the PEFT row needs a base on disk: use --base DIR (not --model) with --torch-python")
        from bench.common import BenchSpec
        from bench.jax_bench import build_model

        model, base = build_model(BenchSpec(model=args.model, seed=args.seed))
        tokenizer = None
    records = []
    for k in args.ks:
        records.append(run_k(args, model, base, tokenizer, k))
        print(json.dumps(records[-1]), flush=True)
    print(markdown(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
