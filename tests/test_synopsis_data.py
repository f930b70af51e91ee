"""The synopsis task's builder (scripts/make_synopsis_data.py) and the shipped data/synopsis: no description or
synopsis shared across splits, held-out descriptions never seen in pre-training, the same index gives the same bytes."""

import json
import os
import random
import re

import pyarrow.parquet as pq
import pytest

from scripts.make_synopsis_data import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _entry(package, synopsis, paragraphs):
    body = "\n .\n".join("\n".join(" " + line for line in p.split("\n")) for p in paragraphs)
    return f"Package: {package}\nDescription-md5: 0\nDescription-en: {synopsis}\n{body}\n"


def _index_blocks(n=60):
    """A Translation-en index: libraries with -dev/-doc packages sharing one description, a synopsis reused by an
    unrelated description (must stay with it), and one-package entries."""
    blocks = []
    for i in range(n):
        words = " ".join(f"w{i}x{j}" for j in range(10))
        paragraphs = [f"Library number {i} does thing {i} with {words}.", f"It also frobnicates item {i} of {words}."]
        blocks.append(_entry(f"lib{i}", f"library for thing {i}", paragraphs))
        if i % 3 == 0:
            blocks.append(_entry(f"lib{i}-dev", f"library for thing {i} (development files)", paragraphs))
            blocks.append(_entry(f"lib{i}-doc", f"library for thing {i} (documentation)", paragraphs))
        if i % 7 == 0:  # same synopsis, another description: one group with lib{i}
            blocks.append(_entry(f"other{i}", f"library for thing {i}", [f"Something else entirely number {i} here and there."]))
    return blocks


def _write_index(path, blocks):
    path.write_text("\n".join(blocks))
    return str(path)


def _pretrain(tmp_path, seen):
    d = tmp_path / "pretrain"
    d.mkdir(exist_ok=True)
    (d / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in seen))
    return str(d)


def _read(out):
    splits = {}
    for name in ("validation", "test"):
        with open(os.path.join(out, f"{name}.jsonl")) as f:
            splits[name] = [json.loads(line) for line in f]
    splits["train"] = pq.read_table(os.path.join(out, "train.parquet")).to_pylist()
    return splits


def _description(row):
    return row["source"].split(": ", 1)[1]


def _assert_no_leakage(splits):
    for key in (_description, lambda r: r["target"].lower()):
        values = {name: {key(r) for r in rows} for name, rows in splits.items()}
        assert not values["train"] & values["validation"] and not values["train"] & values["test"]
        assert not values["validation"] & values["test"]


@pytest.fixture()
def synthetic(tmp_path):
    blocks = _index_blocks()
    seen = [f"Library number {i} does thing {i} with " + " ".join(f"w{i}x{j}" for j in range(10)) + "." for i in range(0, 60, 2)]
    return blocks, _pretrain(tmp_path, seen)


def test_builder_keeps_shared_descriptions_and_synopses_in_one_split(tmp_path, synthetic):
    blocks, pretrain = synthetic
    out = str(tmp_path / "out")
    info = build([_write_index(tmp_path / "x_main_i18n_Translation-en", blocks)], pretrain, out, validation=8,
                 test=12, max_train=None)
    splits = _read(out)
    assert len(splits["validation"]) >= 8 and len(splits["test"]) >= 12
    assert info["train"] + info["validation"] + info["test"] == info["entries"] == len(blocks)
    _assert_no_leakage(splits)
    groups = {name: {r["package"] for r in rows} for name, rows in splits.items()}
    for name, packages in groups.items():  # a library's -dev / -doc follow it
        for p in packages:
            if p.endswith(("-dev", "-doc")):
                assert p.rsplit("-", 1)[0] in packages
    seen_numbers = set(range(0, 60, 2))
    for name in ("validation", "test"):  # only descriptions the pre-training corpus never held
        assert all(int(re.search(r"\d+", r["package"]).group()) not in seen_numbers for r in splits[name])
    assert splits["test"][0]["source"].startswith(splits["test"][0]["package"] + ": ")


def test_builder_is_deterministic_and_ignores_entry_order(tmp_path, synthetic):
    blocks, pretrain = synthetic
    outs = []
    for k, order in enumerate((blocks, random.Random(3).sample(blocks, len(blocks)))):
        out = str(tmp_path / f"out{k}")
        build([_write_index(tmp_path / f"{k}_main_i18n_Translation-en", order)], pretrain, out, 8, 12, max_train=20)
        outs.append({f: open(os.path.join(out, f), "rb").read() for f in ("validation.jsonl", "test.jsonl", "train.parquet")})
    assert outs[0] == outs[1]


def test_builder_refuses_when_too_few_unseen_descriptions(tmp_path, synthetic):
    blocks, pretrain = synthetic
    with pytest.raises(ValueError, match="unseen in pre-training"):
        build([_write_index(tmp_path / "x_main_i18n_Translation-en", blocks)], pretrain, str(tmp_path / "o"), 50, 60, None)


def test_shipped_synopsis_data_has_no_leakage_and_matches_its_info():
    out = os.path.join(ROOT, "data", "synopsis")
    splits = _read(out)
    with open(os.path.join(out, "info.json")) as f:
        info = json.load(f)
    assert {name: len(rows) for name, rows in splits.items()} == {k: info[k] for k in splits}
    assert len(splits["validation"]) >= 1000 and len(splits["test"]) >= 2000
    _assert_no_leakage(splits)
    pretrain = set()
    for name in ("train", "validation"):
        with open(os.path.join(ROOT, "data", "pretrain", f"{name}.jsonl")) as f:
            pretrain.update(json.loads(line)["text"] for line in f)
    for name in ("validation", "test"):
        assert not any(p in pretrain for r in splits[name] for p in _description(r).split("\n"))
    assert all(info["index"][i]["date"] for i in range(len(info["index"])))
