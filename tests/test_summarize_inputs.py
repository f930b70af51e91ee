"""`python -m train.summarize` on awkward input: rows longer than the model's positions are truncated (and it says
so), empty input is one clear error, an empty text gets an empty summary rather than an invented one, and --output in
a missing directory is created up front (or refused before any generation work)."""

import io
import json

import pytest

from tests.conftest import MODEL_DIR
from train import summarize

LIMIT = 128  # the fixture model's max_position_embeddings
FAST = ["--base", MODEL_DIR, "--max-new-tokens", "4", "--no-progress"]


def _rows(tmp_path, rows):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _out(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("extra", [[], ["--max-source-length", "512"]], ids=["default", "above the limit"])
def test_inputs_over_the_model_positions_are_truncated_and_said(tmp_path, capsys, extra):
    long = " ".join(f"word{i}" for i in range(400))
    out = tmp_path / "out.jsonl"
    args = FAST + ["--input", _rows(tmp_path, [{"text": long}, {"text": "short text."}]), "--output", str(out)]
    assert summarize.main(args + extra) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert f"1 of 2 rows truncated to {LIMIT} tokens" in err
    if extra:
        assert f"--max-source-length 512 exceeds the model's max_position_embeddings ({LIMIT})" in err
    assert [isinstance(r["summary"], str) for r in _out(out)] == [True, True]


def test_empty_input_is_one_clear_error(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert summarize.main(FAST + ["--input", str(empty)]) == 2
    assert capsys.readouterr().err.strip() == f"summarize failed: --input {empty} holds no rows to summarize"
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert summarize.main(FAST) == 2
    assert capsys.readouterr().err.strip() == "summarize failed: stdin holds no rows to summarize"


def test_an_empty_text_gets_an_empty_summary(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    rows = [{"text": "Return the number of items."}, {"text": ""}, {"text": "  "}]
    assert summarize.main(FAST + ["--input", _rows(tmp_path, rows), "--output", str(out)]) == 0
    got = _out(out)
    assert [r["summary"] for r in got[1:]] == ["", ""] and got[0]["summary"]
    assert "rows 2, 3: empty text, summary left empty" in capsys.readouterr().err


def test_output_directory_is_created_or_refused_up_front(tmp_path, capsys, monkeypatch):
    out = tmp_path / "new" / "dir" / "out.jsonl"
    rows = _rows(tmp_path, [{"text": "Open a file."}])
    assert summarize.main(FAST + ["--input", rows, "--output", str(out)]) == 0
    assert len(_out(out)) == 1
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setattr(summarize, "_build_server", lambda *a: pytest.fail("generation work before the check"))
    assert summarize.main(FAST + ["--input", rows, "--output", str(blocker / "out.jsonl")]) == 2
    assert f"--output {blocker / 'out.jsonl'}: cannot create its directory" in capsys.readouterr().err


def _base_with_settings(tmp_path, **settings):
    """A copy of the fixture checkpoint whose generation_config.json holds `settings` on top of its own."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(MODEL_DIR, base)
    gen = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**gen, **settings}))
    return str(base)


def test_a_base_that_returns_several_sequences_gives_a_list_per_row(tmp_path, capsys):
    base = _base_with_settings(tmp_path, num_beams=3, num_return_sequences=3, max_new_tokens=4)
    rows = _rows(tmp_path, [{"text": "Return the number of items."}, {"text": "Open a file."}])
    several, one = tmp_path / "several.jsonl", tmp_path / "one.jsonl"
    assert summarize.main(["--base", base, "--no-progress", "--input", rows, "--output", str(several)]) == 0
    assert summarize.main(["--base", base, "--no-progress", "--input", rows, "--output", str(one),
                           "--num-return-sequences", "1"]) == 0, capsys.readouterr().err
    got, best = _out(several), _out(one)
    assert [len(r["summary"]) for r in got] == [3, 3]
    assert [r["summary"][0] for r in got] == [r["summary"] for r in best]  # the n best beams, best first


def test_a_sampling_base_draws_from_the_seed(tmp_path, capsys):
    base = _base_with_settings(tmp_path, do_sample=True, top_k=20, max_new_tokens=6)
    rows = _rows(tmp_path, [{"text": "Return the number of items."}, {"text": "Open a file."}])
    outs = []
    for seed in ("3", "3"):
        out = tmp_path / f"out{len(outs)}.jsonl"
        assert summarize.main(["--base", base, "--no-progress", "--input", rows, "--output", str(out),
                               "--seed", seed]) == 0, capsys.readouterr().err
        outs.append([r["summary"] for r in _out(out)])
    assert outs[0] == outs[1] and all(isinstance(s, str) for s in outs[0])
