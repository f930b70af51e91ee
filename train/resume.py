"""What makes a resumed run the same run: a fingerprint saved with every checkpoint and compared on resume.

The fingerprint holds everything that defines the trained model and its optimizer trajectory: every config key except
those listed in `MAY_DIFFER` (evaluation, logging, checkpoint cadence, where files go, the device mesh), a
fingerprint of the base weights, the content of the training data, the tokenizer's vocabulary, and (when dropout is
on) the layout the dropout masks depend on (`dropout_layout`). Resuming with a
different fingerprint is refused (`ResumeMismatchError` lists the keys) unless the caller accepts the changes, which
are then recorded with the run.
"""

from __future__ import annotations

import glob
import hashlib
import json
from typing import Any, Mapping

import numpy as np

from lora_jax.checkpoints.adapter import base_fingerprint
from lora_jax.dropout import MASK_SCHEME

# Config keys (a trailing "." covers a whole section) that do not change what is trained: they may differ on resume.
MAY_DIFFER = (
    "eval.", "mesh.", "distributed.", "model.remat", "model.scan_layers", "model.attention", "train.compile_cache_dir",
    "train.eval_batch_size", "train.eval_every", "train.save_every", "train.keep_checkpoints", "train.log_every",
    "train.output_dir", "train.max_nonfinite_steps", "train.divergence_factor",
    "data.eval_files", "data.test_files", "data.eval_split", "data.test_split", "data.max_eval_examples", "data.num_proc",
)
# Rows of the tokenized train split hashed for a hub dataset (local files are hashed whole).
SAMPLED_ROWS = 64


class ResumeMismatchError(ValueError):
    """The checkpoint to resume from was trained with another configuration, base, data or tokenizer."""


def flat_config(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"lora.alpha": 16.0, ...} from the nested config dict."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and not prefix:  # sections only: mappings inside a section are one value
            out.update(flat_config(value, f"{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def training_keys(config: Mapping) -> dict[str, Any]:
    """The config entries that define training (everything but MAY_DIFFER), JSON-normalised."""
    flat = flat_config(config)
    keep = {k: v for k, v in flat.items() if not any(k == m or (m.endswith(".") and k.startswith(m)) for m in MAY_DIFFER)}
    return json.loads(json.dumps(keep, sort_keys=True, default=str))


def file_digest(pattern: str) -> str:
    """SHA-256 over the contents of the files matching `pattern`, in name order (names themselves excluded)."""
    digest = hashlib.sha256()
    for path in sorted(glob.glob(pattern)):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def dataset_digest(dataset) -> str:
    """SHA-256 of the row count and a strided sample of a tokenized split's input_ids and labels."""
    digest = hashlib.sha256(str(len(dataset)).encode())
    for i in np.linspace(0, len(dataset) - 1, min(SAMPLED_ROWS, len(dataset))).astype(int):
        row = dataset[int(i)]
        digest.update(json.dumps([row["input_ids"], row["labels"]]).encode())
    return digest.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([type(tokenizer).__name__, vocab, tokenizer.all_special_tokens]).encode()).hexdigest()


def run_fingerprint(config: Mapping, base_params: Mapping, tokenizer, train_split, train_files: str | None) -> dict:
    """The fingerprint of a run: its training config keys, base weights, training data and tokenizer."""
    data = file_digest(train_files) if train_files else dataset_digest(train_split)
    return {"config": training_keys(config), "base_weights": base_fingerprint(base_params), "train_data": data,
            "tokenizer": tokenizer_digest(tokenizer)}


def dropout_layout(dropout_rates, batch_shards: int, rng_impl: str) -> dict | None:
    """What the dropout masks of a step depend on besides (seed, step), or None when no dropout is on.

    The global batch is the same for any processes x devices layout (each process loads its rows, see
    TrainBatches.batches), and with the same number of batch shards the masks are too (2x2 and 1x4 and 4x1 train the
    same run), but a step draws its masks with another PRNG implementation unsharded than sharded, and the sharded
    one draws them per shard: another device count is another trajectory, so resuming on it is refused. The mask
    scheme (`lora_jax.dropout.MASK_SCHEME`) is part of it too: a checkpoint from code that drew masks otherwise
    continues on another random stream, which the resume then says."""
    if not any(rate > 0 for rate in dropout_rates):
        return None
    return {"batch_shards": int(batch_shards), "dropout_rng": rng_impl, "dropout_masks": MASK_SCHEME}


def fingerprint_changes(saved: Mapping | None, current: Mapping) -> dict[str, list]:
    """{what: [in the checkpoint, now]} for every difference; a checkpoint without a fingerprint differs in all."""
    if saved is None:
        return {"fingerprint": ["absent (written by an older lora_jax)", "present"]}
    changes = {}
    old_cfg, new_cfg = saved.get("config", {}), current["config"]
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(key, "<absent>") != new_cfg.get(key, "<absent>"):
            changes[key] = [old_cfg.get(key, "<absent>"), new_cfg.get(key, "<absent>")]
    for key in ("base_weights", "train_data", "tokenizer"):
        if saved.get(key) != current[key]:
            changes[key] = [_short_digest(saved.get(key)), _short_digest(current[key])]
    if saved.get("layout") != current.get("layout"):  # dropout on: device count and PRNG of the masks
        changes["layout"] = [saved.get("layout"), current.get("layout")]
    return changes


def _short_digest(value: Any) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def describe_changes(changes: Mapping[str, list]) -> str:
    return "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())


def mismatch_error(directory: str, step: int, changes: Mapping[str, list]) -> ResumeMismatchError:
    return ResumeMismatchError(
        f"cannot resume from checkpoint step {step} in {directory}: it was trained differently ({describe_changes(changes)}). "
        "Start fresh in another directory with --set train.output_dir=<new dir>, or continue from this checkpoint "
        "anyway with --resume-with-changes (the changes are recorded in summary.json)")
