"""`python -m train.summarize`: rows with their own adapters (lora_jax and PEFT directories), mixed batches, input
order kept, summaries equal to generating each row alone with its adapter."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import lora_jax
from lora_jax.generation import load_generation_config
from tests.conftest import MODEL_DIR, PEFT_DIR
from tests.multi_helpers import CONFIGS, random_adapter
from train import summarize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["Return the number of items in a container.", "Open a file and return a stream.",
         "Split the pathname into a pair (head, tail).", "Create a new thread that runs the function.",
         "Compute the greatest common divisor of two integers."]


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, tiny):
    _, base = tiny
    out = tmp_path_factory.mktemp("adapters")
    config = CONFIGS["all2"]
    lora_jax.save_adapter(str(out / "mine"), lora_jax.combine(base, random_adapter(base, config, 3)), config,
                          base_model=MODEL_DIR)
    return {"mine": str(out / "mine"), "peft": PEFT_DIR}


def _expected(tiny, adapter_dirs, name, text, **settings):
    model, base = tiny
    tokenizer = lora_jax.load_tokenizer(MODEL_DIR)
    batch = tokenizer([text], return_tensors="np")
    if name is None:
        one, params = model, base
    else:
        adapter, config = summarize.load_any_adapter(adapter_dirs[name], base)
        one, params = lora_jax.LoraModel(model, config), lora_jax.combine(base, adapter)
    ids = lora_jax.generate(one, params, batch["input_ids"], batch["attention_mask"],
                            generation_config=load_generation_config(MODEL_DIR), **settings)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip()


def test_mixed_rows_in_input_order_equal_each_row_alone(tmp_path, tiny, adapter_dirs):
    names = ["mine", None, "peft", "mine", "peft"]
    rows = [{"id": i, "body": t, **({"task": n} if n else {})} for i, (t, n) in enumerate(zip(TEXTS, names))]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--base", MODEL_DIR, "--adapter", f"mine={adapter_dirs['mine']}", "--adapter", f"peft={adapter_dirs['peft']}",
            "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"), "--text-column", "body",
            "--adapter-column", "task", "--num-beams", "4", "--max-new-tokens", "12", "--batch-size", "2",
            "--no-progress"]
    assert summarize.main(args) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["id"] for o in out] == list(range(5))
    summaries = [o.pop("summary") for o in out]
    assert out == rows
    expected = [_expected(tiny, adapter_dirs, n, t, num_beams=4, max_new_tokens=12) for t, n in zip(TEXTS, names)]
    assert summaries == expected
    assert len(set(summaries[:3])) == 3  # the adapters really change the output


def test_bad_input_is_named(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n{"text": "b", "adapter": "legal"}\n')
    assert summarize.main(["--base", MODEL_DIR, "--input", str(tmp_path / "in.jsonl"), "--no-progress"]) == 2
    assert "row 2: adapter 'legal' was not given" in capsys.readouterr().err
    (tmp_path / "in.jsonl").write_text('{"body": "a"}\n')
    assert summarize.main(["--base", MODEL_DIR, "--input", str(tmp_path / "in.jsonl")]) == 2
    assert "row 1: no string 'text' field" in capsys.readouterr().err
    assert summarize.main(["--base", MODEL_DIR, "--adapter", "nodir", "--input", str(tmp_path / "in.jsonl")]) == 2
    assert "expected NAME=DIR" in capsys.readouterr().err


def test_plain_text_from_stdin(tiny):
    text = TEXTS[0] + "\n" + TEXTS[1] + "\n"
    proc = subprocess.run([sys.executable, "-m", "train.summarize", "--base", MODEL_DIR, "--max-new-tokens", "8",
                           "--no-progress"], input=text, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [o["text"] for o in out] == TEXTS[:2]
    assert [o["summary"] for o in out] == [_expected(tiny, {}, None, t, max_new_tokens=8) for t in TEXTS[:2]]
    assert json.loads(proc.stderr.strip().splitlines()[-1])["compilations"] == 1


def test_batches_group_similar_lengths():
    assert summarize.plan_batches([5, 1, 9, 2, 7], 2) == [[1, 3], [0, 4], [2]]
    ids, mask = summarize.encode_batch([[5, 6, 7], [8]], [1, 0], 3, 512, 1)
    assert ids.shape == (3, 8) and np.array_equal(mask.sum(1), [1, 3, 1])
