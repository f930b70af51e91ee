"""`python -m train --config configs/<name>.yaml [--set key.sub=value ...]` — see train/loop.py."""

import argparse
import json
import logging
import os
import sys

from lora_jax.training.runtime import enable_compilation_cache, use_memory_aware_cpu_scheduler
from train.config import ConfigError, load_config, to_launch_settings
from train.supervise import enter_supervised_child, job_position, run_supervised

STOPPED_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a process the signal ended


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train", description="Fine-tune BART with LoRA (or fully) with lora_jax.")
    ap.add_argument("--config", required=True, help="YAML run config, e.g. configs/demo.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value with a dotted key, e.g. --set lora.mode=full (repeatable)")
    ap.add_argument("--resume-with-changes", action="store_true",
                    help="resume from the output dir's checkpoint even though the run's configuration, base, data or "
                         "tokenizer changed since it was saved (the changes are recorded in summary.json)")
    supervised = enter_supervised_child()  # first: the sooner a child dies with its supervisor, the better
    args = ap.parse_args(argv)
    use_memory_aware_cpu_scheduler()  # before the first JAX computation; see lora_jax/training/runtime.py
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)  # force: importing orbax installs a root handler
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    position = None if supervised else job_position(to_launch_settings(cfg))
    if position is not None:  # one process of a multi-process job: JAX may abort the training (train/supervise.py)
        return run_supervised(sys.argv[1:] if argv is None else list(argv), position,
                              os.path.join(cfg.train.output_dir, "checkpoints"))
    from train.guard import TrainingDivergedError
    from train.lock import OutputDirLockedError
    enable_compilation_cache(cfg.train.compile_cache_dir)  # before the first compilation
    from train.loop import train

    try:
        summary = train(cfg, resume_with_changes=args.resume_with_changes)
    except (ValueError, FileNotFoundError, OSError, OutputDirLockedError, TrainingDivergedError) as e:
        # bad data, checkpoint, adapter, a busy output dir or a diverged run: say what, not where
        if os.environ.get("LORA_JAX_TRACEBACK"):
            raise
        print(f"error: {e} (set LORA_JAX_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        return 3 if isinstance(e, TrainingDivergedError) else 2
    print(json.dumps({k: summary.get(k) for k in ("steps", "stopped_early", "train_compilations", "train_compile_s", "eval_loss",
                                                  "rouge_before", "rouge_after", "trainable_params", "saved")}, default=float))
    if summary.get("stopped_early"):
        # A preempted run is not a finished one: a job system must not count it as complete.
        print(f"error: stopped by SIGTERM after step {summary['steps']} of {cfg.train.num_steps}; the checkpoint is saved "
              f"at {summary['checkpoint']}; run the same command again to resume", file=sys.stderr)
        return STOPPED_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
