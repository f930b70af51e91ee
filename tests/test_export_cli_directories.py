"""`train.export` never writes beside other files: a non-empty output directory is refused up front (naming it and
--overwrite), and --overwrite replaces it whole; `train.evaluate --adapter` accepts PEFT directories as
`train.summarize` does."""

import json
import os
import shutil
import subprocess
import sys

from tests.conftest import MODEL_DIR, PEFT_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def _run(module, *args):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_non_empty_output_is_refused_up_front_and_overwrite_replaces_it_whole(tmp_path):
    peft_out = tmp_path / "peft"
    shutil.copytree(PEFT_DIR, peft_out)
    (peft_out / "notes.txt").write_text("mine")
    before = sorted(os.listdir(peft_out))
    out = _run("train.export", "--from-peft", PEFT_DIR, "--base", MODEL_DIR, "--peft", peft_out)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"--peft {peft_out} is not empty" in out.stderr and "--overwrite" in out.stderr, out.stderr
    out = _run("train.export", "--from-peft", PEFT_DIR, "--base", MODEL_DIR, "--merged", peft_out)
    assert out.returncode == 2 and f"--merged {peft_out} is not empty (it holds adapter_config.json" in out.stderr
    assert sorted(os.listdir(peft_out)) == before  # nothing written

    out = _run("train.export", "--from-peft", PEFT_DIR, "--base", MODEL_DIR, "--merged", peft_out, "--overwrite")
    assert out.returncode == 0, out.stderr
    files = set(os.listdir(peft_out))
    assert "model.safetensors" in files and not files & (PEFT_FILES | {"notes.txt"}), files
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".peft")]  # no temporary directory left behind

    out = _run("train.export", "--from-peft", PEFT_DIR, "--base", MODEL_DIR, "--peft", peft_out, "--overwrite")
    assert out.returncode == 0, out.stderr
    assert set(os.listdir(peft_out)) == PEFT_FILES | {"lora_jax_base.json"}


def test_export_onto_its_own_source_is_refused(tmp_path):
    shutil.copytree(PEFT_DIR, tmp_path / "p")
    out = _run("train.export", "--from-peft", tmp_path / "p", "--base", MODEL_DIR, "--peft", tmp_path / "p", "--overwrite")
    assert out.returncode == 2 and "is the directory the export reads from" in out.stderr, out.stderr


def test_evaluate_accepts_a_peft_adapter(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"source": f"word {i} and more words", "target": "word"}) + "\n" for i in range(4)))
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"model": {"checkpoint": MODEL_DIR},
                                  "data": {"train_files": str(rows), "eval_files": str(rows), "max_source_length": 32,
                                           "max_target_length": 8},
                                  "eval": {"max_examples": 2, "num_beams": 1, "max_new_tokens": 4},
                                  "train": {"output_dir": str(tmp_path / "out"), "eval_batch_size": 2}}))
    out = _run("train.evaluate", "--config", config, "--adapter", PEFT_DIR, "--split", "eval")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["examples"] == 2
