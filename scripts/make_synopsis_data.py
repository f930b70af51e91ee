"""Builds data/synopsis/{train.parquet,validation.jsonl,test.jsonl}: an abstractive summarization task from Debian's package index.

Each entry of Debian 12's English translation index (the same lists as scripts/make_pretrain_corpus.py: main,
bookworm-updates, bookworm-security, read from /var/lib/apt/lists/*_i18n_Translation-en*) has a one-line synopsis
written by a person and an extended description. Source = "<package>: <extended description>" (paragraphs joined by
newlines; the package name is part of the input because `-doc`, `-dev` and other binaries of one source package share a
description); target = the synopsis. A miniature XSum: the synopsis is rarely a line of the description.

No leakage between splits: entries that share a description, or share a synopsis (case-insensitive), are one group,
and a group lies in one split. Validation and test hold only groups whose descriptions the demo base never saw in
pre-training: no paragraph of them is in data/pretrain (train or validation). Which groups go where is decided by a
hash of their text (no dependence on file order or on Python's hash seed), so the same index gives the same splits.
info.json beside the data records the index files with their dates and the counts.

    apt-get update -o Acquire::Languages=en && python -m scripts.make_synopsis_data [--out data/synopsis]
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re

from scripts.make_pretrain_corpus import entries, long_text

INDEX_GLOB = "/var/lib/apt/lists/*_i18n_Translation-en*"
SPLITS = ("train", "validation", "test")


def read_entries(paths: list[str]) -> list[dict]:
    """{"package", "synopsis", "description"} per package; a package listed again (e.g. by bookworm-security) keeps
    its first entry in `paths` order."""
    rows, seen = [], set()
    for path in paths:
        for package, synopsis, lines in entries(path):
            description = long_text(lines)
            if package in seen or not synopsis.strip() or not description:
                continue
            seen.add(package)
            rows.append({"package": package, "synopsis": " ".join(synopsis.split()), "description": description})
    return rows


def groups(rows: list[dict]) -> list[list[int]]:
    """Row indices grouped so that rows sharing a description or a (lower-cased) synopsis are in one group
    (union-find over both keys)."""
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    for i, row in enumerate(rows):
        for key in (("d", row["description"]), ("s", row["synopsis"].lower())):
            j = first.setdefault(key, i)
            parent[find(i)] = find(j)
    out: dict[int, list[int]] = {}
    for i in range(len(rows)):
        out.setdefault(find(i), []).append(i)
    return list(out.values())


def pretrain_texts(pretrain_dir: str) -> set[str]:
    """Every paragraph the demo base was pre-trained or probed on (data/pretrain/*.jsonl, column "text")."""
    texts = set()
    for path in sorted(glob.glob(os.path.join(pretrain_dir, "*.jsonl"))):
        with open(path) as f:
            texts.update(json.loads(line)["text"] for line in f)
    return texts


def unseen(description: str, pretrain: set[str]) -> bool:
    return not any(p in pretrain for p in description.split("\n"))


def _key(rows: list[dict], group: list[int]) -> str:
    return hashlib.sha256("\0".join(sorted(rows[i]["description"] for i in group)).encode()).hexdigest()


def assign(rows: list[dict], pretrain: set[str], validation: int, test: int) -> dict[str, list[int]]:
    """Split name -> row indices. Groups in hash order; unseen groups fill validation to >= `validation` rows, then test
    to >= `test` rows; everything else is train. Raises ValueError when unseen groups are too few."""
    ordered = sorted(groups(rows), key=lambda g: _key(rows, g))
    out = {name: [] for name in SPLITS}
    for group in ordered:
        held_out_ok = all(unseen(rows[i]["description"], pretrain) for i in group)
        name = "train"
        if held_out_ok and len(out["validation"]) < validation:
            name = "validation"
        elif held_out_ok and len(out["test"]) < test:
            name = "test"
        out[name] += sorted(group, key=lambda i: rows[i]["package"])
    if len(out["validation"]) < validation or len(out["test"]) < test:
        raise ValueError(f"only {len(out['validation'])} + {len(out['test'])} rows have descriptions unseen in "
                         f"pre-training; asked for {validation} + {test}: lower --validation / --test")
    return out


def example(row: dict) -> dict:
    return {"source": f"{row['package']}: {row['description']}", "target": row["synopsis"], "package": row["package"]}


def write_split(stem: str, examples: list[dict], parquet: bool) -> None:
    """stem.jsonl, or stem.parquet (zstd: a quarter of the JSON's size, so the shipped train split stays small)."""
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {k: [e[k] for e in examples] for k in ("source", "target", "package")}
        pq.write_table(pa.table(columns), stem + ".parquet", compression="zstd", compression_level=19)
        return
    with open(stem + ".jsonl", "w") as f:
        for e in examples:
            f.write(json.dumps(e, ensure_ascii=False) + "\n")


def index_date(path: str) -> str | None:
    """The Date: of the InRelease file that lists a Translation-en file (None when absent)."""
    release = re.sub(r"_main_i18n_Translation-en.*$", "_InRelease", path)
    if release == path or not os.path.exists(release):
        return None
    with open(release, errors="replace") as f:
        for line in f:
            if line.startswith("Date:"):
                return line.split(":", 1)[1].strip()
    return None


def build(paths: list[str], pretrain_dir: str, out: str, validation: int, test: int, max_train: int | None) -> dict:
    """Writes the three splits and info.json under `out`; returns info."""
    rows = read_entries(paths)
    pretrain = pretrain_texts(pretrain_dir)
    split = assign(rows, pretrain, validation, test)
    if max_train:  # train is already in hash order of its groups: a prefix is a deterministic sample
        split["train"] = split["train"][:max_train]
    os.makedirs(out, exist_ok=True)
    for name, idx in split.items():
        write_split(os.path.join(out, name), [example(rows[i]) for i in idx], parquet=name == "train")
    descriptions = {r["description"] for r in rows}
    info = {"index": [{"file": os.path.basename(p), "date": index_date(p)} for p in paths],
            "entries": len(rows), "distinct_descriptions": len(descriptions),
            "descriptions_unseen_in_pretraining": sum(unseen(d, pretrain) for d in descriptions),
            "groups": len(groups(rows)), **{name: len(idx) for name, idx in split.items()},
            "mean_target_words": {name: round(sum(len(rows[i]["synopsis"].split()) for i in idx) / max(len(idx), 1), 2)
                                  for name, idx in split.items()},
            "mean_source_words": {name: round(sum(len(example(rows[i])["source"].split()) for i in idx) / max(len(idx), 1), 2)
                                  for name, idx in split.items()}}
    with open(os.path.join(out, "info.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    return info


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/synopsis")
    ap.add_argument("--pretrain", default="data/pretrain", help="the demo base's pre-training corpus (held-out rows avoid it)")
    ap.add_argument("--index", nargs="*", default=None, help=f"Translation-en files (default: {INDEX_GLOB})")
    ap.add_argument("--validation", type=int, default=1000, help="at least this many validation rows")
    ap.add_argument("--test", type=int, default=2500, help="at least this many test rows")
    ap.add_argument("--max-train", type=int, default=32000,
                    help="keep at most this many train rows, a fixed sample (default 32000: 2x the demo's 1000 x 16 "
                    "examples, 4 MB shipped); 0 keeps all")
    args = ap.parse_args(argv)
    paths = sorted(args.index if args.index is not None else glob.glob(INDEX_GLOB))
    if not paths:
        raise SystemExit("no Translation-en lists: run `apt-get update -o Acquire::Languages=en` first")
    info = build(paths, args.pretrain, args.out, args.validation, args.test, args.max_train)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
