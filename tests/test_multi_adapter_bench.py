"""`python -m bench.multi_adapter` runs end to end on the tiny model and its mixed batch equals the sequential runs."""

from bench import multi_adapter
from tests.conftest import MODEL_DIR


def test_bench_runs_and_mixed_equals_sequential(capsys):
    assert multi_adapter.main(["--base", MODEL_DIR, "--ks", "2", "--batch", "4", "--max-new-tokens", "3",
                               "--source-len", "16", "--repeats", "1", "--gen-repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert '"mixed_equals_sequential": true' in out
    assert "| 2 |" in out and "not run" in out  # the PEFT column without --torch-python


def test_bench_runs_on_seeded_random_weights(capsys):
    """--model: the bench's seeded random architecture and tokens instead of a base on disk."""
    assert multi_adapter.main(["--model", "tiny", "--ks", "2", "--batch", "4", "--max-new-tokens", "3",
                               "--source-len", "16", "--repeats", "1", "--gen-repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert '"model": "tiny"' in out and '"mixed_equals_sequential": true' in out


def test_random_weights_refuse_the_peft_row(capsys):
    """The PEFT child needs a base on disk: --model with --torch-python stops, naming both options."""
    import pytest

    with pytest.raises(SystemExit):
        multi_adapter.main(["--model", "tiny", "--torch-python", "python"])
    err = capsys.readouterr().err
    assert "--torch-python" in err and "--base" in err
