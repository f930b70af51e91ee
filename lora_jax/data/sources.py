"""Loading splits (hub dataset or local files) and tokenizing them with `datasets` (which caches the result)."""

from __future__ import annotations

import glob
import logging
import os
from typing import Any

import numpy as np

from lora_jax.data.denoising import text_infilling

log = logging.getLogger(__name__)
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
SPLITS = ("train", "eval", "test")


def _builder(pattern: str) -> str:
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no file matches {pattern!r}")
    exts = {os.path.splitext(f)[1].lower() for f in files}
    if len(exts) != 1 or next(iter(exts)) not in _BUILDERS:
        raise ValueError(f"{pattern!r}: expected files of one type among {sorted(_BUILDERS)}, got {sorted(exts)}")
    return _BUILDERS[exts.pop()]


def load_splits(data_cfg) -> dict[str, Any]:
    """{'train'|'eval'|'test': datasets.Dataset} for the splits the config names (local files or a hub dataset)."""
    import datasets

    out = {}
    if data_cfg.dataset is None:
        for split in SPLITS:
            pattern = getattr(data_cfg, f"{split}_files")
            if pattern is None:
                continue
            files = sorted(glob.glob(pattern))
            out[split] = datasets.load_dataset(_builder(pattern), data_files=files, split="train")
        return out
    for split in SPLITS:
        name = getattr(data_cfg, f"{split}_split")
        try:
            out[split] = datasets.load_dataset(data_cfg.dataset, data_cfg.dataset_config, split=name)
        except ValueError:  # datasets raises ValueError for a split the dataset does not have
            if split == "train":
                raise
            log.warning("dataset %s has no split %r: no %s data", data_cfg.dataset, name, split)
    return out


def check_columns(dataset, columns: dict[str, str]) -> None:
    """columns: {config key: column name}; raises naming the key, the column and the columns that exist."""
    for key, column in columns.items():
        if column not in dataset.column_names:
            raise ValueError(f"{key}: the dataset has no column {column!r}; its columns are {dataset.column_names}")


def _join_rows(dataset, column: str, join_rows: int, seed: int, num_proc: int | None):
    """Row i becomes rows i .. i+k-1 joined with newlines, k ~ uniform{1..join_rows} from (seed, i): multi-paragraph
    texts from a corpus of single paragraphs, a function of (seed, i) only."""
    texts = dataset[column]

    def join(batch, indices):
        out = []
        for i in indices:
            k = int(np.random.default_rng([seed, i, 1]).integers(1, join_rows + 1))
            out.append("\n".join(str(t) for t in texts[i : i + k]))
        return {column: out}

    return dataset.map(join, batched=True, with_indices=True, num_proc=num_proc, desc="joining rows")


def tokenize(dataset, tokenizer, data_cfg, *, seed: int = 0, num_proc: int | None = None):
    """-> (dataset with int lists `input_ids`, `labels` and the reference text `target_text`, rows dropped as empty).

    Sources and targets are truncated to data_cfg.max_source_length / max_target_length (<s> and </s> included).
    With objective "denoising" the source column is both input (after BART text infilling of mask_ratio of its tokens,
    except for a clean_fraction of examples that stay as they are) and target; join_rows > 1 first joins consecutive
    rows into multi-paragraph texts. The noise of example i is a function of (seed, i)."""
    denoise = data_cfg.objective == "denoising"
    src_col = data_cfg.source_column
    tgt_col = src_col if denoise else data_cfg.target_column
    check_columns(dataset, {"data.source_column": src_col, "data.target_column" if not denoise else "data.source_column": tgt_col})
    before = len(dataset)

    def non_empty(batch):
        return [bool(s and str(s).strip()) and bool(t and str(t).strip()) for s, t in zip(batch[src_col], batch[tgt_col])]

    dataset = dataset.filter(non_empty, batched=True, num_proc=num_proc)
    dropped = before - len(dataset)
    if dropped:
        log.warning("dropped %d of %d rows with an empty %s or %s", dropped, before, src_col, tgt_col)
    if denoise and data_cfg.join_rows > 1:
        dataset = _join_rows(dataset, src_col, data_cfg.join_rows, seed, num_proc)
    mask_id = tokenizer.mask_token_id

    def encode(batch, indices):
        sources = [str(s) for s in batch[src_col]]
        targets = [str(t) for t in batch[tgt_col]]
        labels = tokenizer(targets, truncation=True, max_length=data_cfg.max_target_length)["input_ids"]
        if denoise:
            inputs = []
            for ids, i in zip(tokenizer(sources, truncation=True, max_length=data_cfg.max_source_length)["input_ids"], indices):
                rng = np.random.default_rng([seed, i])
                if rng.random() >= data_cfg.clean_fraction:
                    ids = text_infilling(ids, mask_id, rng, mask_ratio=data_cfg.mask_ratio)
                inputs.append(ids[: data_cfg.max_source_length])
        else:
            inputs = tokenizer(sources, truncation=True, max_length=data_cfg.max_source_length)["input_ids"]
        return {"input_ids": inputs, "labels": labels, "target_text": targets}

    dataset = dataset.map(
        encode, batched=True, with_indices=True, remove_columns=dataset.column_names, num_proc=num_proc,
        desc="tokenizing",
    )
    return dataset, dropped
