"""Loading splits (hub dataset or local files) and tokenizing them with `datasets` (which caches the result).

Local files are checked and loaded one by one (lora_jax/data/checks.py), so an error names the file and the row."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
from typing import Any

import numpy as np

from lora_jax.data.checks import DataError, check_file, json_problem, text_columns
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
        raise DataError(f"{pattern!r}: expected files of one type among {sorted(_BUILDERS)}, got {sorted(exts)}")
    return _BUILDERS[exts.pop()]


def text_column_keys(data_cfg) -> dict[str, str]:
    """{config key: column name} of the columns a run reads: the source, and the target unless denoising."""
    columns = {"data.source_column": data_cfg.source_column}
    if data_cfg.objective != "denoising":
        columns["data.target_column"] = data_cfg.target_column
    return columns


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Only CRITICAL records from `logger_name` and its children inside the block."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _read_file(builder: str, path: str):
    """One local file as a Dataset; DataError naming the file (and the line, for JSON) when `datasets` cannot read it."""
    import datasets

    csv_shape = check_file(path)
    # A CSV holds text: read every column as text, so "007" stays "007" instead of pandas' guess, the int 7.
    features = datasets.Features({c: datasets.Value("string") for c in csv_shape[1]}) if csv_shape else None
    try:
        with _quiet("datasets"):  # datasets logs the error it raises; the one we raise says more
            dataset = datasets.load_dataset(builder, data_files=[path], split="train", features=features)
    except Exception as e:  # datasets and pyarrow raise many types (DatasetGenerationError, ArrowInvalid, ...)
        cause = e.__cause__ or e
        first_line = (str(cause).strip().splitlines() or [""])[0]
        detail = (json_problem(path) if builder == "json" else None) or f"{type(cause).__name__}: {first_line}"
        raise DataError(f"data file {path} cannot be read as {builder}: {detail}") from e
    if len(dataset) == 0:
        raise DataError(f"data file {path} has no rows: remove it from the data files or fill it")
    if csv_shape and csv_shape[0] != len(dataset):
        raise DataError(f"data file {path}: pandas reads {len(dataset)} rows where Python's csv module reads "
                        f"{csv_shape[0]}; check its quoting and line breaks")
    return dataset


def _local_split(data_cfg, pattern: str):
    """The files matching `pattern`, each checked (columns and values too), then concatenated."""
    import datasets

    builder, columns = _builder(pattern), text_column_keys(data_cfg)
    parts = []
    for path in sorted(glob.glob(pattern)):
        dataset = _read_file(builder, path)
        check_columns(dataset, columns, where=f"data file {path}")
        dataset = text_columns(dataset, columns, where=f"data file {path}", cast_to_string=data_cfg.cast_to_string)
        parts.append(dataset.select_columns(sorted(set(columns.values()))))  # files may differ in other columns
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def load_splits(data_cfg) -> dict[str, Any]:
    """{'train'|'eval'|'test': datasets.Dataset} for the splits the config names (local files or a hub dataset), with
    the source/target columns checked to hold text (see `text_columns`; data_cfg.cast_to_string converts)."""
    import datasets

    out = {}
    if data_cfg.dataset is None:
        for split in SPLITS:
            pattern = getattr(data_cfg, f"{split}_files")
            if pattern is not None:
                out[split] = _local_split(data_cfg, pattern)
        return out
    columns = text_column_keys(data_cfg)
    for split in SPLITS:
        name = getattr(data_cfg, f"{split}_split")
        try:
            dataset = datasets.load_dataset(data_cfg.dataset, data_cfg.dataset_config, split=name)
        except ValueError:  # datasets raises ValueError for a split the dataset does not have
            if split == "train":
                raise
            log.warning("dataset %s has no split %r: no %s data", data_cfg.dataset, name, split)
            continue
        where = f"dataset {data_cfg.dataset} split {name!r}"
        check_columns(dataset, columns, where=where)
        out[split] = text_columns(dataset, columns, where=where, cast_to_string=data_cfg.cast_to_string)
    return out


def check_columns(dataset, columns: dict[str, str], where: str = "the dataset") -> None:
    """columns: {config key: column name}; raises naming the key, the column and the columns that exist."""
    for key, column in columns.items():
        if column not in dataset.column_names:
            raise DataError(f"{key}: {where} has no column {column!r}; its columns are {dataset.column_names}")


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
    columns = text_column_keys(data_cfg)
    check_columns(dataset, columns)
    dataset = text_columns(dataset, columns, where="the dataset", cast_to_string=getattr(data_cfg, "cast_to_string", False))
    before = len(dataset)

    def non_empty(batch):  # a null (None) value is an empty one
        return [bool(s and s.strip()) and bool(t and t.strip()) for s, t in zip(batch[src_col], batch[tgt_col])]

    dataset = dataset.filter(non_empty, batched=True, num_proc=num_proc)
    dropped = before - len(dataset)
    if dropped:
        log.warning("dropped %d of %d rows with an empty or null %s or %s", dropped, before, src_col, tgt_col)
    if not len(dataset):
        raise DataError(f"every one of the {before} rows has an empty or null {src_col} or {tgt_col}: no data is left")
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
