"""Builds data/demo/{train,validation,test}.jsonl: the demo's task, "find and write a docstring's summary line".

Source of the text: the docstrings (modules, classes, functions) of the Python standard library that ships with the
interpreter running this script (CPython's `Lib/`, e.g. /root/.pyenv/versions/3.11.7/lib/python3.11), read with
`ast.get_docstring`; test suites, idlelib and lib2to3 are skipped. License: the Python Software Foundation License
(the docstrings are part of CPython). The train split also takes the docstrings of the Python packages that
`pip install -e .` puts beside lora_jax (EXTRA_PACKAGES: jax, flax, numpy, transformers, ...; Apache-2.0, BSD and MIT
licensed; the versions used are written to data/demo/sources.json), except those in Google / NumPy section style.
Validation and test are standard-library docstrings only. A different corpus from the base model's pre-training
text (Debian package descriptions).

The task. PEP 257 docstrings open with a one-line summary, then a blank line, then the body. The source is the body
split into sentences and clauses (after ';' and ':'), one per line, with the summary line put back at a random
position among them; the target is the summary line. So no position rule finds it (the first line is the summary in
at most 1 of 4 cases on the evaluation splits), and the lines are alike in form: the model has to read them and
recognise the one that says what the object does.

Kept: summary 3-30 words, no doctest (`>>>`), whole source at most --max-tokens tokens of the demo tokenizer (the
base model's pre-training length). Splits are by module (no module's docstrings are in two splits). Validation and
test keep only docstrings with at least 3 body lines (4+ lines with the summary, so a guessed line is right at most 1 time in 4);
train keeps every docstring with a body, twice, with the summary at two different positions.

    python -m scripts.make_demo_data [--out data/demo]
"""

import argparse
import ast
import json
import os
import random
import re
import sys
import sysconfig

SKIP_DIRS = {"test", "tests", "site-packages", "idlelib", "__pycache__", "lib2to3", "turtledemo"}
# A sentence ends at . ! ? after a word character or closing bracket/quote, before a capital; "e.g." / "i.e." do not.
CLAUSE_END = re.compile(r"(?<=[;:])\s+")
SENTENCE_END = re.compile(r"(?<!\be\.g\.)(?<!\bi\.e\.)(?<=[A-Za-z0-9)\]'\"`][.!?])\s+(?=[A-Z])")
MIN_EVAL_BODY_LINES = 3
# Installed with lora_jax (directly or through its dependencies), so present wherever the demo runs.
EXTRA_PACKAGES = ("jax", "flax", "optax", "orbax", "chex", "transformers", "datasets", "huggingface_hub", "numpy", "scipy",
                  "pandas", "matplotlib", "nltk", "absl", "etils", "pydantic", "fsspec", "tqdm", "tensorboardX", "PIL",
                  "fontTools")
# Google / NumPy docstring sections and reST blocks: their bodies are field lists, not sentences.
SECTIONED = re.compile(r"^\s*(Args|Arguments|Returns?|Raises|Yields|Examples?|Notes?|Parameters|Attributes|See Also|"
                       r"References|Warnings?|Usage)\s*:?\s*$|^\s*[-=~]{3,}\s*$|::", re.M)


def module_docstrings(root: str):
    """Yields (module path, [docstrings]) for every stdlib module."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            try:
                tree = ast.parse(open(path, encoding="utf-8").read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            docs = [ast.get_docstring(n) for n in ast.walk(tree)
                    if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
            yield os.path.relpath(path, root), [d for d in docs if d]


def summary_and_lines(doc: str):
    """(summary line, [body lines: its sentences and clauses]) for a PEP 257 docstring with a summary line and a body,
    else None."""
    parts = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)
    if len(parts) != 2 or "\n" in parts[0].strip() or ">>>" in doc:
        return None
    summary = " ".join(parts[0].split())
    if not 3 <= len(summary.split()) <= 30:
        return None
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", parts[1].strip())]
    lines = [c for p in paragraphs if p for s in SENTENCE_END.split(p) for c in CLAUSE_END.split(s) if c.strip()]
    return (summary, lines) if lines else None


def make_row(module: str, summary: str, body: list[str], position: int) -> dict:
    lines = body[:position] + [summary] + body[position:]
    return {"module": module, "source": "\n".join(lines), "target": summary, "summary_line": position}


def two_positions(module: str, summary: str, body: list[str], rng: random.Random) -> list[dict]:
    """Two training rows of one docstring, with the summary line at two different positions."""
    first = rng.randint(0, len(body))
    second = (first + rng.randint(1, len(body))) % (len(body) + 1)
    return [make_row(module, summary, body, first), make_row(module, summary, body, second)]


def _version(package: str) -> str:
    import importlib.metadata

    names = {"PIL": "pillow", "fontTools": "fonttools", "absl": "absl-py", "orbax": "orbax-checkpoint", "huggingface_hub": "huggingface-hub"}
    try:
        return importlib.metadata.version(names.get(package, package))
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def baseline_scores(rows: list[dict], score) -> dict[str, float]:
    """Mean score of the trivial answers: the first, last, longest and shortest line, and a random line (its expected
    score: the mean over all lines of a row). score(prediction, reference) -> float."""
    rules = {"first line": lambda ls: ls[0], "last line": lambda ls: ls[-1],
             "longest line": lambda ls: max(ls, key=len), "shortest line": lambda ls: min(ls, key=len)}
    out = {name: 0.0 for name in ["first line", "last line", "random line", "longest line", "shortest line"]}
    for row in rows:
        lines = row["source"].split("\n")
        for name, rule in rules.items():
            out[name] += score(rule(lines), row["target"])
        out["random line"] += sum(score(line, row["target"]) for line in lines) / len(lines)
    return {name: total / max(len(rows), 1) for name, total in out.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/demo")
    ap.add_argument("--eval", type=int, default=150, help="rows in each of validation and test")
    ap.add_argument("--tokenizer", default="data/demo_tokenizer")
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    root = sysconfig.get_paths()["stdlib"]
    seen = set()

    def usable(docs):
        kept = []
        for doc in docs:
            p = None if SECTIONED.search(doc) else summary_and_lines(doc)
            if p is None or p[0] in seen or len(tokenizer("\n".join([p[0]] + p[1]))["input_ids"]) > args.max_tokens:
                continue
            seen.add(p[0])
            kept.append(p)
        return kept

    modules = [(module, usable(docs)) for module, docs in module_docstrings(root)]
    modules = [(m, d) for m, d in modules if d]
    rng = random.Random(0)
    rng.shuffle(modules)
    splits = {"test": [], "validation": [], "train": []}
    for module, docs in modules:
        long_docs = [d for d in docs if len(d[1]) >= MIN_EVAL_BODY_LINES]
        split = next((s for s in ("test", "validation") if len(splits[s]) < args.eval and long_docs), "train")
        if split != "train":
            splits[split] += [make_row(module, s, b, rng.randint(0, len(b))) for s, b in long_docs]
            continue
        for summary, body in docs:
            splits["train"] += two_positions(module, summary, body, rng)
    site = sysconfig.get_paths()["purelib"]
    versions = {}
    for package in EXTRA_PACKAGES:
        path = os.path.join(site, package)
        if not os.path.isdir(path):
            raise SystemExit(f"{package} is not installed in {site}: run this script in lora_jax's environment")
        versions[package] = _version(package)
        for module, docs in module_docstrings(path):
            for summary, body in usable(docs):
                splits["train"] += two_positions(os.path.join(package, module), summary, body, rng)
    rng.shuffle(splits["train"])
    os.makedirs(args.out, exist_ok=True)
    for split, rows in splits.items():
        with open(os.path.join(args.out, f"{split}.jsonl"), "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    info = {"stdlib": root, "python": sys.version.split()[0], "packages": versions, **{k: len(v) for k, v in splits.items()}}
    with open(os.path.join(args.out, "sources.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
