"""The training job: fine-tune BART with LoRA (or fully) on a summarization or denoising objective.

    python -m train --config configs/demo.yaml [--set key.sub=value ...]

Re-running the same command resumes from the newest checkpoint in `<output_dir>/checkpoints`.
Writes to `<output_dir>`: metrics.jsonl, tensorboard/, checkpoints/, adapter/ (LoRA) or model/ (full), loss_curve.png,
samples.txt, predictions.jsonl, summary.json, config.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax
from lora_jax import sharding
from lora_jax.data import TrainBatches, load_splits, tokenize
from lora_jax.models.bart import BartForConditionalGeneration, init_params
from lora_jax.models.config import BartConfig
from lora_jax.training.runtime import release_host_memory
from lora_jax.training.checkpoint import TrainCheckpointer
from train import evaluate
from train.config import RunConfig, config_to_dict, to_lora_config
from train.metrics_log import MetricsLog, plot_loss_curve

log = logging.getLogger("train")


@dataclasses.dataclass
class Run:
    """Everything a run is built from (model, params, tokenizer, tokenized splits, settings)."""

    cfg: RunConfig
    model: Any
    params: Any
    tokenizer: Any
    splits: dict
    dropped: dict
    lora_config: Any
    mesh: Any
    gen: Any
    pad_id: int
    start_id: int

    @property
    def apply_model(self):
        return lora_jax.with_lora(self.model, self.lora_config)


def _dtype(name: str):
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def load_model(cfg: RunConfig, mesh):
    """(model, params) from the checkpoint, sharded onto the mesh, or randomly initialised from model.init_config."""
    dtype = _dtype(cfg.model.dtype)
    if cfg.model.checkpoint is not None:
        return lora_jax.load_pretrained(cfg.model.checkpoint, dtype=dtype, mesh=mesh if mesh.size > 1 else None)
    config = BartConfig.from_dict(cfg.model.init_config)
    model = BartForConditionalGeneration(config, dtype=dtype, param_dtype=dtype)
    return model, init_params(model, jax.random.PRNGKey(cfg.train.seed))


def build(cfg: RunConfig, for_training: bool = True, adapter_dir: str | None = None) -> Run:
    """Loads model, tokenizer and data, and applies the LoRA config (fresh adapters, or `adapter_dir`'s)."""
    mesh = sharding.make_mesh(sharding.MeshConfig(cfg.mesh.data, cfg.mesh.fsdp))
    model, params = load_model(cfg, mesh)
    model = model.clone(remat=cfg.model.remat)  # rematerialisation policy; parameters unchanged
    tokenizer = lora_jax.load_tokenizer(cfg.model.tokenizer or cfg.model.checkpoint)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size}")
    splits, dropped = {}, {}
    for name, ds in load_splits(cfg.data).items():
        splits[name], dropped[name] = tokenize(ds, tokenizer, cfg.data, seed=cfg.train.seed, num_proc=cfg.data.num_proc)
    if for_training and "train" not in splits:
        raise ValueError("no training data: set data.train_files or data.dataset")
    lora_config = to_lora_config(cfg)
    if adapter_dir is not None:
        from lora_jax.checkpoints.adapter import load_adapter

        adapter, lora_config, _ = load_adapter(adapter_dir, base_params=params)
        params = lora_jax.combine(params, adapter)
    elif lora_config is not None and for_training:
        params = lora_jax.init_lora(params, lora_config, jax.random.PRNGKey(cfg.train.seed + 1))
    gen = evaluate.generation_settings(cfg, model.config, cfg.model.checkpoint)
    return Run(cfg, model, params, tokenizer, splits, dropped, lora_config, mesh, gen,
               model.config.pad_token_id, model.config.decoder_start_token_id)


def _optimizer(cfg: RunConfig, lora_config):
    o = cfg.optim
    schedule = lora_jax.learning_rate_schedule(o.learning_rate, cfg.train.num_steps, o.warmup_steps, o.schedule)
    make_tx = lora_jax.adamw_factory(o.weight_decay, o.b1, o.b2, o.eps)
    tx = lora_jax.lora_optimizer(make_tx, lora_config, learning_rate=schedule, loraplus_lr_ratio=cfg.lora.loraplus_lr_ratio,
                                 full_finetune=lora_config is None)
    return tx, schedule


def _checkpointable(state) -> dict:
    return {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state}


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _save_result(run: Run, state, out: str) -> dict:
    """Writes the adapter (LoRA) or the full model (full fine-tuning); returns what was written and its size."""
    params = jax.device_get(state.params)
    if run.lora_config is not None:
        from lora_jax.checkpoints.adapter import save_adapter

        path = os.path.join(out, "adapter")
        save_adapter(path, params, run.lora_config, base_model=run.cfg.model.checkpoint or "random-init", base_params=params)
    else:
        path = os.path.join(out, "model")
        lora_jax.save_pretrained(path, params, run.model.config, tokenizer_dir=run.cfg.model.tokenizer or run.cfg.model.checkpoint,
                                 generation_config={k: v for k, v in dataclasses.asdict(run.gen).items()})
    return {"path": path, "bytes": _dir_bytes(path)}


def _rouge(run: Run, params, split: str) -> tuple[dict, list, list, list]:
    return evaluate.score(run.apply_model, params, run.tokenizer, run.splits[split], run.cfg, run.gen, run.pad_id, run.start_id)


def train(cfg: RunConfig) -> dict:
    """Runs (or resumes) training; returns the summary that is also written to summary.json."""
    sharding.maybe_initialize_distributed()
    main = sharding.is_main_process()
    out = cfg.train.output_dir
    os.makedirs(out, exist_ok=True)
    run = build(cfg)
    lora_config, full = run.lora_config, run.lora_config is None
    trainable, total, percent = lora_jax.count_params(run.params, lora_config, full_finetune=full, verbose=main)
    tx, schedule = _optimizer(cfg, lora_config)
    state = lora_jax.create_train_state(run.params, lora_config, tx, full_finetune=full)
    state_shardings = None
    if run.mesh.size > 1:
        state, state_shardings = sharding.shard_state(state, run.mesh)
    step_fn = lora_jax.make_train_step(
        run.model, lora_config, label_smoothing=cfg.optim.label_smoothing, grad_accum_steps=cfg.optim.grad_accum_steps,
        max_grad_norm=cfg.optim.max_grad_norm, schedule=schedule,
        shardings=None if state_shardings is None else (state_shardings, sharding.batch_sharding(run.mesh)),
    )
    eval_step = lora_jax.make_eval_step(run.model, lora_config)
    batches = TrainBatches(run.splits["train"], cfg.train.batch_size, cfg.data.max_source_length, cfg.data.max_target_length,
                           pad_id=run.pad_id, decoder_start_id=run.start_id, seed=cfg.train.seed, padding=cfg.data.padding)
    ckpt = TrainCheckpointer(os.path.join(out, "checkpoints"), keep=cfg.train.keep_checkpoints, save_every=cfg.train.save_every)
    metrics_log = MetricsLog(out, enabled=main)
    if main:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(config_to_dict(cfg), f, indent=2)

    extra = {"position": None, "rouge_before": None}
    restored = ckpt.restore_latest(_checkpointable(state))
    if restored is not None:
        pieces, extra, step = restored
        state = state.replace(**pieces)
        log.info("resumed from step %d (data position %s)", step, extra["position"])
    elif cfg.eval.rouge_before and "eval" in run.splits:
        scores, *_ = _rouge(run, state.params, "eval")
        extra["rouge_before"] = scores
        log.info("ROUGE before fine-tuning: %s", _fmt(scores))
        metrics_log.write(0, "eval_before", scores)

    summary = _loop(run, cfg, state, step_fn, eval_step, batches, ckpt, metrics_log, extra, schedule, main)
    summary.update(trainable_params=trainable, total_params=total, trainable_percent=percent,
                   rows_dropped=run.dropped, batch_shapes_possible=len(batches.shapes()))
    ckpt.close()
    metrics_log.close()
    if main:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=float)
    return summary


def _fmt(scores: dict) -> str:
    return " ".join(f"{k}={v:.2f}" for k, v in scores.items())


def _loop(run, cfg, state, step_fn, eval_step, batches, ckpt, metrics_log, extra, schedule, main) -> dict:
    from tqdm import tqdm

    out = cfg.train.output_dir
    rng = jax.random.PRNGKey(cfg.train.seed)
    start = int(state.step)
    stream = batches.batches(extra["position"])
    bar = tqdm(total=cfg.train.num_steps, initial=start, disable=not main, dynamic_ncols=True, desc="train")
    window_tokens, window_start, last = 0, time.perf_counter(), {}
    stopped_early = False
    step = start
    compilations = step_fn.num_compilations()
    for step in range(start + 1, cfg.train.num_steps + 1):
        batch, position = next(stream)
        if run.mesh.size > 1:
            batch = sharding.shard_batch({k: v[sharding.host_slice(len(v))] for k, v in batch.items()}, run.mesh)
        state, metrics = step_fn(state, batch, rng)
        if step_fn.num_compilations() > compilations:  # a new bucket shape was compiled: drop the compiler's garbage
            compilations = step_fn.num_compilations()
            release_host_memory()
        window_tokens += int(np.asarray(batch["attention_mask"]).sum() + (np.asarray(batch["labels"]) != -100).sum())
        extra["position"] = position
        if step % cfg.train.log_every == 0 or step == cfg.train.num_steps:
            last = {k: float(v) for k, v in jax.device_get(metrics).items()}
            elapsed = time.perf_counter() - window_start
            last["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
            window_tokens, window_start = 0, time.perf_counter()
            metrics_log.write(step, "train", last)
            bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{last.get('learning_rate', 0):.2e}", tok_s=f"{last['tokens_per_s']:.0f}")
        bar.update(1)
        if "eval" in run.splits and (step % cfg.train.eval_every == 0) and step != cfg.train.num_steps:
            loss = evaluate.eval_loss(eval_step, state.params, run.splits["eval"], cfg, run.pad_id, run.start_id)
            metrics_log.write(step, "eval", {"loss": loss})
        stop = ckpt.should_stop(step)
        ckpt.maybe_save(step, _checkpointable(state), extra, force=stop)
        if stop:
            stopped_early = True
            break
    bar.close()
    summary = {"steps": step, "stopped_early": stopped_early, "train_compilations": step_fn.num_compilations(),
               "last_train_metrics": last, "output_dir": out}
    if stopped_early:
        return summary
    ckpt.maybe_save(step, _checkpointable(state), extra, force=True)
    summary.update(_finish(run, cfg, state, eval_step, metrics_log, extra, main))
    return summary


def _finish(run, cfg, state, eval_step, metrics_log, extra, main) -> dict:
    """Final evaluation, ROUGE, samples, loss curve, and the adapter (or model) on disk."""
    out, result = cfg.train.output_dir, {}
    step = int(state.step)
    if "eval" in run.splits:
        result["eval_loss"] = evaluate.eval_loss(eval_step, state.params, run.splits["eval"], cfg, run.pad_id, run.start_id)
        scores, preds, refs, sources = _rouge(run, state.params, "eval")
        result.update(rouge_before=extra.get("rouge_before"), rouge_after=scores)
        metrics_log.write(step, "eval", {"loss": result["eval_loss"], **scores})
        if main:
            _write_samples(out, sources, preds, refs, cfg.eval.num_samples)
            if extra.get("rouge_before"):
                log.info("ROUGE before: %s", _fmt(extra["rouge_before"]))
            log.info("ROUGE after:  %s", _fmt(scores))
    if main:
        result["saved"] = _save_result(run, state, out)
        result["loss_curve"] = plot_loss_curve(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss_curve.png"))
        log.info("saved %s (%.1f KB)", result["saved"]["path"], result["saved"]["bytes"] / 1024)
    return result


def _write_samples(out: str, sources, preds, refs, n: int) -> None:
    with open(os.path.join(out, "predictions.jsonl"), "w") as f:
        for s, p, r in zip(sources, preds, refs):
            f.write(json.dumps({"source": s, "prediction": p, "reference": r}) + "\n")
    lines = []
    for s, p, r in list(zip(sources, preds, refs))[:n]:
        lines += [f"SOURCE:     {s[:300]}", f"PREDICTION: {p}", f"REFERENCE:  {r}", ""]
    with open(os.path.join(out, "samples.txt"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
