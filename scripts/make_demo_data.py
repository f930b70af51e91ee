"""Builds data/demo/{train,validation,test}.jsonl: the demo's summarization task, "docstring -> its summary line".

Source of the text: the docstrings (modules, classes, functions) of the Python standard library that ships with the
interpreter running this script (CPython's `Lib/`, e.g. /root/.pyenv/versions/3.11.7/lib/python3.11), read with
`ast.get_docstring`; test suites, idlelib and lib2to3 are skipped. PEP 257 docstrings open with a one-line summary,
then a blank line, then the body: the source is the whole docstring (whitespace normalised, one paragraph per line),
the target its summary line. Kept: summary 3-30 words, whole docstring 15-200 words; duplicates dropped; modules are
split between train / validation / test so no module's docstrings are in two splits. License: the Python Software
Foundation License (the docstrings are part of CPython).

This is a different corpus from the base model's pre-training text (Debian package descriptions).

    python -m scripts.make_demo_data [--out data/demo]
"""

import argparse
import ast
import json
import os
import random
import re
import sysconfig

SKIP_DIRS = {"test", "tests", "site-packages", "idlelib", "__pycache__", "lib2to3", "turtledemo"}


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


def pair(doc: str):
    """(source, target) for a PEP 257 docstring with a summary line and a body, else None."""
    parts = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)
    if len(parts) != 2 or "\n" in parts[0].strip():
        return None
    summary = " ".join(parts[0].split())
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", doc.strip())]
    source = "\n".join(p for p in paragraphs if p)
    if not 3 <= len(summary.split()) <= 30 or not 15 <= len(source.split()) <= 200 or ">>>" in source:
        return None
    return source, summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/demo")
    ap.add_argument("--eval", type=int, default=200)
    args = ap.parse_args()
    root = sysconfig.get_paths()["stdlib"]
    modules, seen = [], set()
    for module, docs in module_docstrings(root):
        rows = []
        for doc in docs:
            p = pair(doc)
            if p and p[0] not in seen:
                seen.add(p[0])
                rows.append({"module": module, "source": p[0], "target": p[1]})
        if rows:
            modules.append(rows)
    random.Random(0).shuffle(modules)
    splits = {"test": [], "validation": [], "train": []}
    for rows in modules:
        split = "test" if len(splits["test"]) < args.eval else "validation" if len(splits["validation"]) < args.eval else "train"
        splits[split] += rows
    os.makedirs(args.out, exist_ok=True)
    for split, rows in splits.items():
        with open(os.path.join(args.out, f"{split}.jsonl"), "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    print(json.dumps({"root": root, **{k: len(v) for k, v in splits.items()}}))


if __name__ == "__main__":
    main()
