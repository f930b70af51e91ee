"""Evaluation: eval loss and ROUGE of beam-search summaries; also a CLI that scores an adapter or a merged model.

    python -m train.evaluate --config configs/demo.yaml --adapter runs/demo/adapter --split test --out preds.jsonl
    python -m train.evaluate --config configs/demo.yaml --adapter out/peft_adapter --split test   # a PEFT adapter
    python -m train.evaluate --config configs/demo.yaml --set model.checkpoint=runs/demo/merged --split test
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from lora_jax.data import eval_batches
from lora_jax.generation import GenerationConfig, generate, generate_padded
from lora_jax.generation.api import trim
from lora_jax.sharding import distributed
from train.build import build
from train.config import ConfigError, load_config
from train.rouge import rouge

log = logging.getLogger(__name__)


def eval_loss(eval_step, params, dataset, cfg, pad_id: int, start_id: int, put_batch=None) -> float:
    """Mean token cross-entropy over (up to data.max_eval_examples of) the split. put_batch(batch) -> the batch the
    step runs on (e.g. this process's rows, sharded over the mesh; default: the whole batch)."""
    loss_sum = tokens = 0.0
    for batch, _ in eval_batches(dataset, cfg.train.eval_batch_size, cfg.data.max_source_length, cfg.data.max_target_length,
                                 pad_id=pad_id, decoder_start_id=start_id, max_examples=cfg.data.max_eval_examples):
        out = eval_step(params, batch if put_batch is None else put_batch(batch))
        loss_sum += float(out["loss_sum"])
        tokens += float(out["tokens"])
    return loss_sum / max(tokens, 1.0)


def _generate(model, params, batch, gen: GenerationConfig, put_batch=None):
    """Ids (B, L) on the host. With put_batch, the batch is split over the mesh (each process generating for its own
    rows) and the ids are gathered from every process."""
    if put_batch is None:
        return generate(model, params, batch["input_ids"], batch["attention_mask"], generation_config=gen)
    inputs = put_batch({k: batch[k] for k in ("input_ids", "attention_mask")})
    ids = generate_padded(model, params, inputs["input_ids"], inputs["attention_mask"], generation_config=gen)
    return trim(distributed.to_host(ids), gen)


def summarize(model, params, tokenizer, dataset, cfg, gen: GenerationConfig, pad_id: int, start_id: int,
              put_batch=None):
    """-> (predictions, references, sources) for up to eval.max_examples rows, with lora_jax's beam search.
    put_batch: as for `eval_loss` (the rows of each batch shared out over the mesh and the processes)."""
    preds, refs = [], []
    for batch, references in eval_batches(dataset, cfg.train.eval_batch_size, cfg.data.max_source_length,
                                          cfg.data.max_target_length, pad_id=pad_id, decoder_start_id=start_id,
                                          max_examples=cfg.eval.max_examples):
        ids = _generate(model, params, batch, gen, put_batch)
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        keep = batch["example_mask"].astype(bool)
        preds += [t.strip() for t, k in zip(texts, keep) if k]
        refs += references
    n = len(preds)
    sources = tokenizer.batch_decode([dataset[i]["input_ids"] for i in range(n)], skip_special_tokens=True)
    return preds, refs, sources


def score(model, params, tokenizer, dataset, cfg, gen, pad_id, start_id, put_batch=None) -> tuple[dict, list, list, list]:
    """-> (ROUGE scores, predictions, references, sources) of `summarize`."""
    preds, refs, sources = summarize(model, params, tokenizer, dataset, cfg, gen, pad_id, start_id, put_batch)
    return rouge(preds, refs), preds, refs, sources


def write_predictions(path: str, sources: Sequence[str], preds: Sequence[str], refs: Sequence[str]) -> None:
    """One JSON line {"source", "prediction", "reference"} per example."""
    with open(path, "w") as f:
        for s, p, r in zip(sources, preds, refs):
            f.write(json.dumps({"source": s, "prediction": p, "reference": r}) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Score a base model, an adapter, or a merged model with ROUGE on a split.")
    ap.add_argument("--config", required=True, help="run config YAML (model, data, eval sections are used)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    ap.add_argument("--adapter", help="adapter directory to apply to the base: a lora_jax adapter (from training or "
                    "save_adapter) or a PEFT one (adapter_config.json), as train.summarize accepts")
    ap.add_argument("--split", default="test", choices=["eval", "test"], help="which split to score")
    ap.add_argument("--out", help="write predictions as JSON lines here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)  # force: importing orbax installs a root handler
    try:
        cfg = load_config(args.config, args.set)
        run = build(cfg, for_training=False, adapter_dir=args.adapter)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # bad data, checkpoint or adapter: say what (as python -m train does)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.split not in run.splits:
        print(f"the config names no {args.split} data (data.{args.split}_files / data.{args.split}_split)", file=sys.stderr)
        return 2
    scores, preds, refs, sources = score(run.apply_model, run.params, run.tokenizer, run.splits[args.split], cfg, run.gen,
                                         run.pad_id, run.start_id)
    print(json.dumps({"split": args.split, "examples": len(preds), **{k: round(v, 2) for k, v in scores.items()}}))
    if args.out:
        write_predictions(args.out, sources, preds, refs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
