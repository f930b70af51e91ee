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
import math
import os
import time
from typing import Callable

import jax
import numpy as np

import lora_jax
from lora_jax import sharding
from lora_jax.sharding import distributed
from lora_jax.checkpoints.files import dir_bytes
from lora_jax.data import TrainBatches
from lora_jax.generation.config import model_generation_config
from lora_jax.lora.residual_init import plain_lora_on_original
from lora_jax.models.bart import IGNORE
from lora_jax.training import TrainCheckpointer, TrainState
from lora_jax.training.runtime import release_host_memory
from lora_jax.training.step import StepFn, default_dropout_rng_impl
from train import evaluate
from train.build import Run, build, make_optimizer
from train.config import RunConfig, config_to_dict, to_launch_settings
from train.guard import (OUTLIER_PATIENCE, GuardSettings, TrainingDivergedError, all_finite, divergence, loss_outlier,
                         remember, skipped_counts)
from train.lock import job_lock, release_own_lock
from train.metrics_log import MetricsLog, plot_loss_curve
from train.resume import describe_changes, dropout_layout, fingerprint_changes, mismatch_error, run_fingerprint
from train.supervise import resume_hint

log = logging.getLogger("train")


@dataclasses.dataclass(frozen=True)
class Machinery:
    """What the loop runs with, made once per run: the jitted steps, the batch stream, the checkpointer, the log."""

    train_step: StepFn
    eval_step: Callable
    batches: TrainBatches
    checkpointer: TrainCheckpointer
    metrics_log: MetricsLog | None  # opened once the step the run continues from is known
    guard: GuardSettings
    is_main: bool  # only process 0 writes files


@dataclasses.dataclass(frozen=True)
class LoopState:
    """Where training stands: the TrainState plus what a resumed run needs to carry on (`resume_info`, saved as JSON
    with every checkpoint) and what the summary reports."""

    state: TrainState
    fingerprint: dict  # what defines this run's training (train.resume); saved with every checkpoint
    position: dict | None = None  # data position after the last batch taken (TrainBatches)
    rouge_before: dict | None = None  # ROUGE of the model before fine-tuning, when measured
    resume_changes: tuple = ()  # changes accepted with --resume-with-changes: ({"step", "changes"}, ...)
    last_metrics: dict = dataclasses.field(default_factory=dict)  # the last logged train metrics
    losses_seen: tuple = ()  # recent losses read by the divergence guard (train.guard)
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient, in total
    verified_step: int = 0  # the last step whose loss the divergence guard checked and found good
    outliers_in_a_row: int = 0  # consecutive guard checks whose loss was an outlier (train.guard)
    stopped_early: bool = False  # SIGTERM or a preemption notice stopped the run

    @property
    def step(self) -> int:
        return int(self.state.step)

    def resume_info(self) -> dict:
        return {"position": self.position, "rouge_before": self.rouge_before, "fingerprint": self.fingerprint,
                "resume_changes": list(self.resume_changes)}


def _eval_put_batch(run: Run):
    """How evaluation places a batch: split over the mesh like a train batch (each process passing its own rows) when
    train.eval_batch_size divides evenly over the devices; otherwise (None) every device runs the whole batch."""
    size = run.cfg.train.eval_batch_size
    if run.mesh.size > 1 and size % run.mesh.size == 0:
        rows = sharding.host_slice(size)
        return lambda batch: sharding.shard_batch({k: v[rows] for k, v in batch.items()}, run.mesh)
    return None


def _eval_loss(run: Run, m: Machinery, params) -> float:
    return evaluate.eval_loss(m.eval_step, params, run.splits["eval"], run.cfg, run.pad_id, run.start_id,
                              _eval_put_batch(run))


def _checkpointable(state: TrainState) -> dict:
    return {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state}


def _fmt(scores: dict) -> str:
    return " ".join(f"{k}={v:.2f}" for k, v in scores.items())


def _rouge(run: Run, params, split: str) -> tuple[dict, list, list, list]:
    return evaluate.score(run.apply_model, params, run.tokenizer, run.splits[split], run.cfg, run.gen, run.pad_id,
                          run.start_id, _eval_put_batch(run))


def make_machinery(run: Run, state: TrainState, schedule, state_shardings, is_main: bool) -> Machinery:
    cfg, out = run.cfg, run.cfg.train.output_dir
    train_step = lora_jax.make_train_step(
        run.model, run.lora_config, label_smoothing=cfg.optim.label_smoothing, grad_accum_steps=cfg.optim.grad_accum_steps,
        max_grad_norm=cfg.optim.max_grad_norm, schedule=schedule,
        shardings=None if state_shardings is None else (state_shardings, sharding.batch_sharding(run.mesh)),
    )
    batches = TrainBatches(run.splits["train"], cfg.train.batch_size, cfg.data.max_source_length, cfg.data.max_target_length,
                           pad_id=run.pad_id, decoder_start_id=run.start_id, seed=cfg.train.seed, padding=cfg.data.padding)
    checkpointer = TrainCheckpointer(os.path.join(out, "checkpoints"), keep=cfg.train.keep_checkpoints,
                                     save_every=cfg.train.save_every)
    guard = GuardSettings(cfg.train.max_nonfinite_steps, cfg.train.divergence_factor)
    return Machinery(train_step, lora_jax.make_eval_step(run.model, run.lora_config), batches, checkpointer, None,
                     guard, is_main)


def restore(m: Machinery, state: TrainState, fingerprint: dict, resume_with_changes: bool) -> LoopState:
    """The newest readable checkpoint's LoopState, or a fresh one. A checkpoint trained with another fingerprint
    stops the run (ResumeMismatchError) unless `resume_with_changes`, which records the changes."""
    accepted = []

    def accept(step: int, extra: dict) -> bool:
        changes = fingerprint_changes(extra.get("fingerprint"), fingerprint)
        if not changes:
            return True
        if not resume_with_changes:
            raise mismatch_error(m.checkpointer.directory, step, changes)
        log.warning("resuming from step %d with changes (--resume-with-changes): %s", step, describe_changes(changes))
        accepted.append({"step": step, "changes": changes})
        return False

    restored = m.checkpointer.restore_latest(_checkpointable(state), accept)
    if restored is None:
        return LoopState(state, fingerprint)
    pieces, info, step = restored
    log.info("resumed from step %d (data position %s)", step, info["position"])
    return LoopState(state.replace(**pieces), fingerprint, position=info["position"], rouge_before=info.get("rouge_before"),
                     resume_changes=tuple(info.get("resume_changes", [])) + tuple(accepted), verified_step=step + 1)


def score_base(run: Run, m: Machinery, loop: LoopState) -> LoopState:
    """A fresh run scores the base first (eval.rouge_before) -> the LoopState holding the scores."""
    if loop.step > 0 or not (run.cfg.eval.rouge_before and "eval" in run.splits):
        return loop
    scores, *_ = _rouge(run, loop.state.params, "eval")
    log.info("ROUGE before fine-tuning: %s", _fmt(scores))
    m.metrics_log.write(0, "eval_before", scores)
    return dataclasses.replace(loop, rouge_before=scores)


def train(cfg: RunConfig, resume_with_changes: bool = False) -> dict:
    """Runs (or resumes) training; returns the summary that is also written to summary.json. Raises
    ResumeMismatchError (another configuration in the checkpoints), OutputDirLockedError (another run writes there)
    and TrainingDivergedError (the guard stopped the run; summary.json says so and no adapter is written)."""
    settings = to_launch_settings(cfg)
    distributed.initialize(settings)
    is_main = distributed.is_main_process()
    os.makedirs(cfg.train.output_dir, exist_ok=True)
    checkpoints = os.path.join(cfg.train.output_dir, "checkpoints")
    with distributed.watch_peers(settings, lambda: resume_hint(checkpoints),
                                 lambda: release_own_lock(cfg.train.output_dir)), job_lock(cfg.train.output_dir):
        return _train_locked(cfg, resume_with_changes, is_main)


def _train_locked(cfg: RunConfig, resume_with_changes: bool, is_main: bool) -> dict:
    out = cfg.train.output_dir
    run = build(cfg)
    full = run.lora_config is None
    trainable, total, percent = lora_jax.count_params(run.params, run.lora_config, full_finetune=full, verbose=is_main)
    fingerprint = run_fingerprint(config_to_dict(cfg), run.params, run.tokenizer, run.splits["train"],
                                  cfg.data.train_files if cfg.data.dataset is None else None)
    mc = run.model.config
    fingerprint["layout"] = dropout_layout(
        (mc.dropout, mc.attention_dropout, mc.activation_dropout, 0.0 if full else run.lora_config.dropout),
        run.mesh.size, default_dropout_rng_impl(sharded=run.mesh.size > 1))
    tx, schedule = make_optimizer(cfg, run.lora_config)
    # A scanned model's frozen layers are kept pre-stacked (no per-step stacking copy); the run then drops its
    # per-layer tree, so one copy of the base is alive, not two.
    state = lora_jax.create_train_state(run.params, run.lora_config, tx, full_finetune=full,
                                        stack_layers=cfg.model.scan_layers and not full)
    run = dataclasses.replace(run, params=None)
    state_shardings = None
    if run.mesh.size > 1:
        state, state_shardings = sharding.shard_state(state, run.mesh)
    m = make_machinery(run, state, schedule, state_shardings, is_main)
    loop = restore(m, state, fingerprint, resume_with_changes)
    m = dataclasses.replace(m, metrics_log=MetricsLog(out, enabled=is_main, resume_step=loop.step))
    if is_main:  # written only once resuming is known to be allowed
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(config_to_dict(cfg), f, indent=2)
    summary = {"output_dir": out, "trainable_params": trainable, "total_params": total, "trainable_percent": percent,
               "rows_dropped": run.dropped, "batch_shapes_possible": len(m.batches.shapes())}
    try:
        loop = run_steps(run, m, score_base(run, m, loop))
    except TrainingDivergedError as e:
        kept = m.checkpointer.steps()
        summary.update(status="diverged", error=str(e), steps=e.step, last_good_checkpoint=kept[0] if kept else None,
                       **_compile_summary(m))
        _close(m, summary, is_main)
        raise
    summary.update(status="stopped_early" if loop.stopped_early else "finished", steps=loop.step,
                   stopped_early=loop.stopped_early, **_compile_summary(m), last_train_metrics=loop.last_metrics,
                   skipped_steps=loop.skipped_steps,
                   resume_changes=list(loop.resume_changes))
    if loop.stopped_early:  # preempted: the checkpoint to resume from, for the exit message and job systems
        summary["checkpoint"] = os.path.join(m.checkpointer.directory, str(loop.step))
    else:
        summary.update(finish(run, m, loop))
    _close(m, summary, is_main)
    return summary


def _compile_summary(m: Machinery) -> dict:
    stats = m.train_step.compile_stats()
    return {"train_compilations": m.train_step.num_compilations(), "train_compile_s": stats.seconds,
            "train_compile_cache_hits": stats.cache_hits}


def _close(m: Machinery, summary: dict, is_main: bool) -> None:
    m.checkpointer.close()
    m.metrics_log.close()
    if is_main:
        with open(os.path.join(summary["output_dir"], "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=float)


def _counted_tokens(batch) -> int:
    """Source tokens plus counted target tokens of a (process-local, numpy) batch (for tokens/s)."""
    return int(np.asarray(batch["attention_mask"]).sum() + (np.asarray(batch["labels"]) != IGNORE).sum())


def guard_check(m: Machinery, loop: LoopState, metrics: dict, step: int, saving: bool) -> LoopState:
    """Reads the step's loss and the skip counters (a host sync: call it where the loop syncs anyway; with
    `saving`, also checks that the trainable leaves are finite) and stops a diverged run -> the LoopState with the
    loss remembered and `step` as the newest verified one."""
    loss = float(jax.device_get(metrics["loss"]))
    in_a_row, total = skipped_counts(loop.state.opt_state)
    if total > loop.skipped_steps:
        log.warning("step %d: %d step(s) skipped so far for a non-finite loss or gradient norm", step, total)
    outlier = loss_outlier(m.guard, loss, loop.losses_seen)
    outliers = loop.outliers_in_a_row + 1 if outlier else 0
    if outlier:
        log.warning("step %d: %s (%d of %d checks in a row before the run stops)", step, outlier, outliers, OUTLIER_PATIENCE)
    reason = divergence(m.guard, in_a_row, outliers, outlier)
    if reason is None and saving and not all_finite(loop.state.trainable):
        reason = "the trainable parameters are no longer finite"
    # Every process reads the same replicated numbers; agreeing anyway means no process can go on into a
    # collective that a peer which stopped will never join.
    if distributed.any_process(reason is not None) and reason is None:
        reason = "the divergence guard of another process stopped the run"
    if reason is not None:
        stop_diverged(m, loop, step, reason)
    # A non-finite or outlying loss vouches for nothing: the parameters it was computed from may be the first bad ones.
    good = math.isfinite(loss) and outlier is None
    return dataclasses.replace(loop, losses_seen=remember(loop.losses_seen, loss) if good else loop.losses_seen,
                               skipped_steps=total, outliers_in_a_row=outliers,
                               verified_step=step if good else loop.verified_step)


def stop_diverged(m: Machinery, loop: LoopState, step: int, reason: str) -> None:
    """Sets aside the checkpoints no good loss has vouched for and raises TrainingDivergedError.

    The loss of step s is computed from the parameters after update s - 1, so the last check that passed (step v)
    vouches for checkpoints up to step v - 1; a checkpoint saved at v or later may hold the first bad update."""
    for suspect in [s for s in m.checkpointer.steps() if s >= loop.verified_step]:
        m.checkpointer.set_aside(suspect, f"saved after step {loop.verified_step - 1}, the last one a good loss vouches for",
                                 suffix=".diverged", what="may hold diverged weights")
    kept = m.checkpointer.steps()
    where = (f"the last good checkpoint is step {kept[0]} in {m.checkpointer.directory} (continue from it with the new "
             "settings and --resume-with-changes, or" if kept else "no good checkpoint exists (")
    raise TrainingDivergedError(
        f"training diverged at step {step}: {reason}; the run stopped without saving, {where} start fresh in "
        "another train.output_dir). Lower optim.learning_rate or raise optim.warmup_steps", step)


def run_steps(run: Run, m: Machinery, loop: LoopState) -> LoopState:
    """Steps from `loop.step` to train.num_steps (or until SIGTERM), logging, evaluating and checkpointing as the
    train section says, the divergence guard checked before every log and save -> the LoopState after the last step
    taken (checkpointed)."""
    from tqdm import tqdm

    cfg, rng = run.cfg.train, jax.random.PRNGKey(run.cfg.train.seed)
    rows = sharding.host_slice(run.cfg.train.batch_size)  # this process's rows of each global batch
    stream = m.batches.batches(loop.position, rows)
    bar = tqdm(total=cfg.num_steps, initial=loop.step, disable=not m.is_main, dynamic_ncols=True, desc="train")
    window_tokens, window_start = 0, time.perf_counter()
    compilations, metrics = m.train_step.num_compilations(), None
    for step in range(loop.step + 1, cfg.num_steps + 1):
        local_batch, position = next(stream)
        window_tokens += _counted_tokens(local_batch)
        batch = sharding.shard_batch(local_batch, run.mesh) if run.mesh.size > 1 else local_batch
        state, metrics = m.train_step(loop.state, batch, rng)
        loop = dataclasses.replace(loop, state=state, position=position)
        if m.train_step.num_compilations() > compilations:  # a new bucket shape was compiled: drop the compiler's garbage
            compilations = m.train_step.num_compilations()
            release_host_memory()
            log.info("train step for batch shape %s compiled: %s so far", tuple(batch["input_ids"].shape),
                     m.train_step.compile_stats().describe())
        logging_now = step % cfg.log_every == 0 or step == cfg.num_steps
        stopping = m.checkpointer.should_stop(step)
        if logging_now or stopping or m.checkpointer.due(step):
            loop = guard_check(m, loop, metrics, step, saving=stopping or m.checkpointer.due(step))
        if logging_now:
            loop = dataclasses.replace(loop, last_metrics=_log_train(m, bar, step, metrics, window_tokens, window_start))
            window_tokens, window_start = 0, time.perf_counter()
        bar.update(1)
        if "eval" in run.splits and step % cfg.eval_every == 0 and step != cfg.num_steps:
            loss = _eval_loss(run, m, state.params)
            m.metrics_log.write(step, "eval", {"loss": loss})
        if stopping:
            loop = dataclasses.replace(loop, stopped_early=True)
            break
        m.checkpointer.maybe_save(step, _checkpointable(state), loop.resume_info(), also_keep=_last_trusted(m, loop))
    bar.close()
    m.checkpointer.maybe_save(loop.step, _checkpointable(loop.state), loop.resume_info(), force=True,
                              also_keep=_last_trusted(m, loop))
    return loop


def _last_trusted(m: Machinery, loop: LoopState) -> int | None:
    """The newest checkpoint a good loss has vouched for (see stop_diverged): retention keeps it."""
    return max((s for s in m.checkpointer.steps() if s < loop.verified_step), default=None)


def _log_train(m: Machinery, bar, step: int, metrics: dict, window_tokens: int, window_start: float) -> dict:
    """Writes the step's metrics with the tokens/s since the last log -> the metrics written."""
    record = {k: float(v) for k, v in jax.device_get(metrics).items()}
    # each process counts its own rows over its own window: their sum is the job's throughput (a collective)
    record["tokens_per_s"] = distributed.host_sum(window_tokens / max(time.perf_counter() - window_start, 1e-9))
    m.metrics_log.write(step, "train", record)
    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record.get('learning_rate', 0):.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
    return record


def finish(run: Run, m: Machinery, loop: LoopState) -> dict:
    """Final evaluation, ROUGE, samples, loss curve, and the adapter (or model) on disk."""
    cfg, out, result = run.cfg, run.cfg.train.output_dir, {}
    params = loop.state.params
    if "eval" in run.splits:
        result["eval_loss"] = _eval_loss(run, m, params)
        scores, preds, refs, sources = _rouge(run, params, "eval")
        result.update(rouge_before=loop.rouge_before, rouge_after=scores)
        m.metrics_log.write(loop.step, "eval", {"loss": result["eval_loss"], **scores})
        if m.is_main:
            evaluate.write_predictions(os.path.join(out, "predictions.jsonl"), sources, preds, refs)
            _write_samples(out, sources, preds, refs, cfg.eval.num_samples)
            if loop.rouge_before:
                log.info("ROUGE before: %s", _fmt(loop.rouge_before))
            log.info("ROUGE after:  %s", _fmt(scores))
    result["saved"] = save_result(run, loop.state, out, m.is_main)  # every process joins the collective parts
    if m.is_main:
        result["loss_curve"] = plot_loss_curve(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss_curve.png"))
        log.info("saved %s (%.1f KB)", result["saved"]["path"], result["saved"]["bytes"] / 1024)
    return result


def save_result(run: Run, state: TrainState, out: str, is_main: bool = True) -> dict:
    """Writes the adapter (LoRA) or the full model (full fine-tuning); returns what was written and its size.
    Every process of a multi-process job calls it: the parameters are gathered by all, and the adapter's Orbax
    save is joined by all; plain files come from process 0 (`is_main`)."""
    params = state.params
    if run.lora_config is not None:
        path = os.path.join(out, "adapter")
        adapter = distributed.to_host(lora_jax.adapter_params(params, run.lora_config))
        config, base = run.lora_config, params  # the base is fingerprinted where it lies (no gathering)
        if run.initial_adapter is not None:  # PiSSA / OLoRA trained on a residual: save a LoRA of the untouched base
            base = run.original_params
            adapter, config = plain_lora_on_original(adapter, distributed.to_host(run.initial_adapter), config)
        lora_jax.save_adapter(path, adapter, config, base_model=run.cfg.model.checkpoint or "random-init",
                              base_params=base)
    else:
        path = os.path.join(out, "model")
        params = distributed.to_host(params)
        if is_main:
            # the base checkpoint's generation settings go with the model (as transformers' Trainer saves them);
            # the run's eval: overrides were for scoring and stay in config.json of the run
            lora_jax.save_pretrained(path, params, run.model.config,
                                     generation_config=model_generation_config(run.model),
                                     tokenizer_dir=run.cfg.model.tokenizer or run.cfg.model.checkpoint)
        distributed.barrier("lora_jax.train.saved_model")
    return {"path": path, "bytes": dir_bytes(path)}  # complete on every process: the saves end with a barrier


def _write_samples(out: str, sources, preds, refs, n: int) -> None:
    lines = []
    for s, p, r in list(zip(sources, preds, refs))[:n]:
        lines += [f"SOURCE:     {s[:300]}", f"PREDICTION: {p}", f"REFERENCE:  {r}", ""]
    with open(os.path.join(out, "samples.txt"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
