"""Builds data/pretrain/{train,validation}.jsonl: the corpus for the demo base model's denoising pre-training.

Source of the text: Debian 12 (bookworm) package descriptions, from the English translation index that
`apt-get update -o Acquire::Languages=en` downloads from deb.debian.org (main, bookworm + updates + security), i.e.
/var/lib/apt/lists/*_i18n_Translation-en.lz4, read with `/usr/lib/apt/apt-helper cat-file`. Only the extended
descriptions are used, split into their paragraphs (8-120 words each; short units let a small model learn BART's
reconstruction quickly), exact duplicates dropped. Debian package
descriptions are part of the Debian archive metadata and are distributed with it.

This is a different corpus from the demo's task (Python docstrings, scripts/make_demo_data.py).

    apt-get update -o Acquire::Languages=en && python -m scripts.make_pretrain_corpus [--out data/pretrain]
"""

import argparse
import glob
import json
import os
import random
import subprocess


def read_index(path: str) -> str:
    """A Translation-en file's text: apt's own reader for its compressed lists (.lz4, .gz, ...), plain read otherwise."""
    if path.endswith("Translation-en"):
        with open(path, encoding="utf-8") as f:
            return f.read()
    return subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", path], capture_output=True, text=True, check=True).stdout


def entries(path: str):
    """(package, synopsis, extended-description lines) of each entry in a Translation-en file."""
    yield from parse_entries(read_index(path))


def parse_entries(text: str):
    """(package, synopsis, extended-description lines) of each entry of a Translation-en file's text."""
    for block in text.split("\n\n"):
        package, desc_lines, in_desc = None, [], False
        for line in block.splitlines():
            if line.startswith("Package:"):
                package = line.split(":", 1)[1].strip()
            elif line.startswith("Description-en:"):
                desc_lines, in_desc = [line.split(":", 1)[1].strip()], True
            elif in_desc and line.startswith(" "):
                desc_lines.append(line[1:])
            else:
                in_desc = False
        if package and len(desc_lines) > 1:
            yield package, desc_lines[0], desc_lines[1:]


def long_text(lines: list[str]) -> str:
    """Debian's extended-description format (" ." separates paragraphs) -> plain text, one paragraph per line."""
    paragraphs, current = [], []
    for line in lines:
        if line.strip() == ".":
            paragraphs.append(" ".join(current))
            current = []
        else:
            current.append(line.strip())
    paragraphs.append(" ".join(current))
    return "\n".join(" ".join(p.split()) for p in paragraphs if p.strip())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/pretrain")
    ap.add_argument("--max-rows", type=int, default=60000)
    ap.add_argument("--validation", type=int, default=500)
    args = ap.parse_args()
    files = sorted(glob.glob("/var/lib/apt/lists/*_i18n_Translation-en*"))
    if not files:
        raise SystemExit("no Translation-en lists: run `apt-get update -o Acquire::Languages=en` first")
    seen, texts = set(), []
    for path in files:
        for _, _, lines in entries(path):
            for text in long_text(lines).split("\n"):
                if 8 <= len(text.split()) <= 120 and text not in seen:
                    seen.add(text)
                    texts.append(text)
    random.Random(0).shuffle(texts)
    texts = texts[: args.max_rows]
    splits = {"validation": texts[: args.validation], "train": texts[args.validation :]}
    os.makedirs(args.out, exist_ok=True)
    for split, rows in splits.items():
        with open(os.path.join(args.out, f"{split}.jsonl"), "w") as f:
            for text in rows:
                f.write(json.dumps({"text": text}) + "\n")
    print(json.dumps({"candidates": len(seen), **{k: len(v) for k, v in splits.items()}}))


if __name__ == "__main__":
    main()
