"""Padding tokenized examples into a bounded set of batch shapes, with deterministic, resumable shuffling.

With padding "bucket", each example goes to the smallest (source, target) size pair from `bucket_sizes` that holds it,
and batches are formed within a bucket, so a jitted train step compiles at most len(src sizes) x len(tgt sizes)
times. Order within an epoch is a function of (seed, epoch) only, so a position {"epoch", "batch"} saved in a
checkpoint resumes exactly the same stream of batches.
"""

from __future__ import annotations

import bisect
from typing import Iterator, Sequence

import numpy as np

from lora_jax.models.bart import IGNORE


def bucket_sizes(max_length: int, smallest: int = 16) -> list[int]:
    """Powers of two from `smallest` below `max_length`, then `max_length`: e.g. 128 -> [16, 32, 64, 128]."""
    sizes = []
    size = smallest
    while size < max_length:
        sizes.append(size)
        size *= 2
    return sizes + [max_length]


def collate(
    examples: Sequence[dict], src_len: int, tgt_len: int, pad_id: int, decoder_start_id: int, batch_size: int | None = None
) -> dict[str, np.ndarray]:
    """Pads examples (`input_ids`, `labels` int lists) to (B, src_len) / (B, tgt_len) int32 arrays.

    labels are -100 on padding; decoder_input_ids are labels shifted right after decoder_start_id (pad for -100);
    with batch_size > len(examples), padding rows are added and `example_mask` marks the real ones."""
    n = batch_size or len(examples)
    input_ids = np.full((n, src_len), pad_id, np.int32)
    labels = np.full((n, tgt_len), IGNORE, np.int32)
    for i, ex in enumerate(examples):
        src, tgt = ex["input_ids"][:src_len], ex["labels"][:tgt_len]
        input_ids[i, : len(src)] = src
        labels[i, : len(tgt)] = tgt
    attention_mask = (np.arange(src_len)[None, :] < np.array([min(len(e["input_ids"]), src_len) for e in examples] + [0] * (n - len(examples)))[:, None]).astype(np.int32)
    decoder_input_ids = np.concatenate([np.full((n, 1), decoder_start_id, np.int32), labels[:, :-1]], axis=1)
    decoder_input_ids = np.where(decoder_input_ids == IGNORE, pad_id, decoder_input_ids).astype(np.int32)
    tgt_lens = np.array([min(len(e["labels"]), tgt_len) for e in examples] + [1] * (n - len(examples)))
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "decoder_input_ids": decoder_input_ids,
        "decoder_attention_mask": (np.arange(tgt_len)[None, :] < np.maximum(tgt_lens, 1)[:, None]).astype(np.int32),
        "labels": labels,
    }
    if batch_size is not None:
        batch["example_mask"] = (np.arange(n) < len(examples)).astype(np.int32)
    return batch


class TrainBatches:
    """An endless, epoch-by-epoch shuffled stream of padded training batches.

    dataset: rows with `input_ids` and `labels` (token id lists). Rows that do not fill a last batch of their bucket
    are left out of that epoch (they take part in others, since the shuffle changes every epoch)."""

    def __init__(self, dataset, batch_size: int, max_source_length: int, max_target_length: int, *, pad_id: int,
                 decoder_start_id: int, seed: int = 0, padding: str = "bucket"):
        self.batch_size, self.seed = batch_size, seed
        self.pad_id, self.decoder_start_id = pad_id, decoder_start_id
        self.examples = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in dataset]
        if padding == "bucket":
            self.src_sizes, self.tgt_sizes = bucket_sizes(max_source_length), bucket_sizes(max_target_length)
        elif padding == "fixed":
            self.src_sizes, self.tgt_sizes = [max_source_length], [max_target_length]
        else:
            raise ValueError(f"padding must be 'bucket' or 'fixed', got {padding!r}")
        self.buckets = [
            (self.src_sizes[bisect.bisect_left(self.src_sizes, min(len(e["input_ids"]), max_source_length))],
             self.tgt_sizes[bisect.bisect_left(self.tgt_sizes, min(len(e["labels"]), max_target_length))])
            for e in self.examples
        ]
        if len(self.examples) < batch_size:
            raise ValueError(f"the training set has {len(self.examples)} rows, fewer than batch_size={batch_size}")

    def shapes(self) -> list[tuple[int, int]]:
        """Every (source_len, target_len) a batch can have: an upper bound on train-step compilations."""
        return [(s, t) for s in self.src_sizes for t in self.tgt_sizes]

    def epoch_plan(self, epoch: int) -> list[tuple[tuple[int, int], list[int]]]:
        """The batches of `epoch` as (shape, row indices), in order; a function of (seed, epoch) only."""
        rng = np.random.default_rng([self.seed, epoch])
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i in rng.permutation(len(self.examples)):
            by_bucket.setdefault(self.buckets[i], []).append(int(i))
        plan = []
        for shape in sorted(by_bucket):
            rows = by_bucket[shape]
            plan += [(shape, rows[k : k + self.batch_size]) for k in range(0, len(rows) - self.batch_size + 1, self.batch_size)]
        order = rng.permutation(len(plan))
        return [plan[i] for i in order]

    def batches(self, position: dict | None = None, rows: slice = slice(None)
                ) -> Iterator[tuple[dict[str, np.ndarray], dict]]:
        """Yields (batch, position after it) forever, starting at `position` ({"epoch", "batch"}; None = the start).

        rows: which rows of each global batch to load (a process of a multi-process job loads only its own slice,
        `lora_jax.sharding.host_slice`); the plan, and so the global batch, is the same for every `rows`."""
        epoch, index = (position or {}).get("epoch", 0), (position or {}).get("batch", 0)
        while True:
            plan = self.epoch_plan(epoch)
            if not plan:
                raise ValueError("no bucket holds a full batch: lower train.batch_size or use data.padding=fixed")
            for k in range(index, len(plan)):
                (src_len, tgt_len), indices = plan[k]
                batch = collate([self.examples[i] for i in indices[rows]], src_len, tgt_len, self.pad_id,
                                self.decoder_start_id)
                yield batch, {"epoch": epoch, "batch": k + 1}
            epoch, index = epoch + 1, 0


def eval_batches(dataset, batch_size: int, max_source_length: int, max_target_length: int, *, pad_id: int,
                 decoder_start_id: int, max_examples: int | None = None):
    """Fixed-shape evaluation batches in dataset order: yields (batch with `example_mask`, reference texts)."""
    n = len(dataset) if max_examples is None else min(len(dataset), max_examples)
    for start in range(0, n, batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, n))]
        batch = collate(rows, max_source_length, max_target_length, pad_id, decoder_start_id, batch_size)
        yield batch, [r.get("target_text", "") for r in rows]
