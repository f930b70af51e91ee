"""The PEFT row of bench.quality: PyTorch PEFT LoRA trained side by side with lora_jax's, same recipe.

Same as lora_jax's run of that row: the base (data/demo_base is already in PyTorch layout, scripts/export_base.py),
the tokenized splits and the exact batches in the same order (train.build + lora_jax.data.TrainBatches with the run's
seed), steps, batch, learning rate with the same warm-up and linear decay, AdamW settings, gradient clipping, dropout,
rank, alpha, targets, and the generation settings (lora_jax's GenerationConfig passed to transformers' generate).
Not the same: the adapters' random initialisation (each framework's own generator) and float rounding.
Runs in a Python with torch, transformers and peft (bench.quality --torch-python); prints records as bench.quality does.

    python -m bench.quality_torch --spec '{"name": "peft", "rank": 8, ...}' [--json-out quality.jsonl]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import time

IGNORE = -100


def lr_lambda(warmup: int, total: int, schedule: str):
    """lora_jax.learning_rate_schedule's multiplier at optimizer step s (0 = first update), for torch's LambdaLR."""
    warmup = min(warmup, max(total - 1, 0))
    decay = max(total - warmup, 1)

    def factor(s: int) -> float:
        if s < warmup:
            return s / warmup
        t = min(s - warmup, decay) / decay
        return {"linear": 1.0 - t, "cosine": 0.5 * (1 + math.cos(math.pi * t)), "constant": 1.0}[schedule]

    return factor


def peft_model(checkpoint: str, spec: dict, dropout: float, seed: int):
    """transformers' BART from the lora_jax base with a PEFT LoRA adapter of the spec's rank, alpha = 2r, targets."""
    import peft
    import torch
    import transformers

    torch.manual_seed(seed)
    base = transformers.BartForConditionalGeneration.from_pretrained(checkpoint)
    config = peft.LoraConfig(r=spec["rank"], lora_alpha=2 * spec["rank"], target_modules=spec["targets"],
                             lora_dropout=dropout, bias="none")
    return peft.get_peft_model(base, config)


def _torch_batch(batch: dict) -> dict:
    import torch

    keys = ("input_ids", "attention_mask", "decoder_input_ids", "labels")
    return {k: torch.tensor(batch[k], dtype=torch.long) for k in keys}


def train_peft(run, spec: dict, lr: float, seed: int):
    """Trains the PEFT model on lora_jax's batches; -> (model, wall seconds of the loop)."""
    import torch

    from lora_jax.data import TrainBatches

    cfg = run.cfg
    model = peft_model(cfg.model.checkpoint, spec, cfg.lora.dropout, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    opt = torch.optim.AdamW(params, lr=lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o.warmup_steps, cfg.train.num_steps, o.schedule))
    batches = TrainBatches(run.splits["train"], cfg.train.batch_size, cfg.data.max_source_length,
                           cfg.data.max_target_length, pad_id=run.pad_id, decoder_start_id=run.start_id,
                           seed=cfg.train.seed, padding=cfg.data.padding).batches()
    model.train()
    start = time.perf_counter()
    for _ in range(cfg.train.num_steps):
        batch, _ = next(batches)
        loss = model(**_torch_batch(batch)).loss
        opt.zero_grad()
        loss.backward()
        if o.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm)
        opt.step()
        sched.step()
    return model, time.perf_counter() - start


def predict(model, run, split: str, max_examples) -> tuple[list[str], list[str], float]:
    """(predictions, references, mean token loss) on a split with lora_jax's eval batches and generation settings."""
    import torch

    from lora_jax.data import eval_batches

    cfg, gen = run.cfg, dataclasses.asdict(run.gen)
    kwargs = {k: v for k, v in gen.items() if k not in ("max_length",) and v is not None}
    model.eval()
    preds, refs, loss_sum, tokens = [], [], 0.0, 0
    with torch.no_grad():
        for batch, references in eval_batches(run.splits[split], cfg.train.eval_batch_size, cfg.data.max_source_length,
                                              cfg.data.max_target_length, pad_id=run.pad_id,
                                              decoder_start_id=run.start_id, max_examples=max_examples):
            t = _torch_batch(batch)
            logits = model(**{k: v for k, v in t.items() if k != "labels"}).logits
            mask = t["labels"] != IGNORE
            mask &= torch.tensor(batch["example_mask"], dtype=torch.bool)[:, None]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), t["labels"].clamp(min=0), reduction="none")
            loss_sum, tokens = loss_sum + float((nll * mask).sum()), tokens + int(mask.sum())
            ids = model.generate(input_ids=t["input_ids"], attention_mask=t["attention_mask"], **kwargs)
            keep = batch["example_mask"].astype(bool)
            texts = run.tokenizer.batch_decode(ids, skip_special_tokens=True)
            preds += [x.strip() for x, k in zip(texts, keep) if k]
            refs += references
    return preds, refs, loss_sum / max(tokens, 1)


def run_one(spec: dict, lr: float, seed: int, work: str) -> dict:
    """One PEFT run: train, validation ROUGE and loss, test predictions; a record shaped like bench.quality's."""
    from bench.quality import overrides, with_test_scores
    from bench.quality_rouge import rouge_with_intervals
    from train.build import build
    from train.config import load_config

    cfg = load_config(spec["config"], overrides({**spec, "mode": "lora"}, lr, seed, work))
    run = build(cfg)
    start = time.perf_counter()
    model, _ = train_peft(run, spec, lr, seed)
    preds, refs, eval_loss = predict(model, run, "eval", cfg.eval.max_examples)
    wall = time.perf_counter() - start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    record = {"system": spec["name"], "mode": "peft", "rank": spec["rank"], "targets": spec["targets"],
              "learning_rate": lr, "seed": seed, "steps": spec["steps"], "eval_loss": eval_loss,
              "validation": rouge_with_intervals(preds, refs), "train_wall_s": wall, "trainable_params": trainable,
              "total_params": total, "train_compilations": 0, "chosen": True, "edge": False}
    return with_test_scores(record, *predict(model, run, "test", cfg.eval.max_examples)[:2])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", required=True, help="bench.quality's system spec (JSON) with rank, targets, lrs, seeds")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    from bench.common import emit
    from bench.memory import max_rss_bytes

    spec = json.loads(args.spec)
    with tempfile.TemporaryDirectory() as work:
        records = [run_one(spec, spec["lrs"][0], seed, os.path.join(work, f"s{seed}")) for seed in spec["seeds"]]
    for record in records:
        emit({**record, "peak_rss_bytes": max_rss_bytes()}, args.json_out)


if __name__ == "__main__":
    main()
