"""train/supervise.py without a real job: tiny Python children stand in for the training (the real thing, kill -9 of
the coordinator, is in tests/test_multihost.py)."""

import os
import signal
import sys
import threading
import time

import pytest

from lora_jax.sharding.distributed import PEER_FAULT_EXIT_CODE, LaunchSettings
from tests.multihost import ROOT
from train.supervise import job_position, run_supervised

POSITION = {"process_id": 1, "num_processes": 2, "coordinator_address": "127.0.0.1:1234"}


def _python(code):
    return (sys.executable, "-c", code)


def test_a_jax_abort_of_the_training_gives_one_line_naming_the_coordinator_and_the_last_checkpoint(tmp_path, capfd):
    checkpoints = tmp_path / "checkpoints"
    for name in ("5", "10", "15.orbax-checkpoint-tmp-3"):  # 15: a save not every process finished
        (checkpoints / name).mkdir(parents=True)
    rc = run_supervised([], POSITION, str(checkpoints), _python("import os; os.abort()"))
    assert rc == PEER_FAULT_EXIT_CODE
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln]
    assert lines == [f"error: process 1 of 2: the job's coordinator (process 0, 127.0.0.1:1234) or JAX's distributed "
                     f"runtime failed (JAX aborted this process); the last checkpoint every process completed is step "
                     f"10 in {checkpoints}: re-run the same command on every process to resume from it"]


@pytest.mark.parametrize("code, want", [("raise SystemExit(3)", 3), ("import os; os.kill(os.getpid(), 9)", 137)])
def test_other_ends_pass_the_training_exit_code_through(tmp_path, capfd, code, want):
    assert run_supervised([], POSITION, str(tmp_path), _python(code)) == want
    assert "error:" not in capfd.readouterr().err


def test_sigterm_to_the_supervisor_reaches_the_training(tmp_path):
    ready = tmp_path / "ready"
    child = ("import signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))\n"
             f"open({str(ready)!r}, 'w').close()\n"
             "time.sleep(120)\n")

    def send_sigterm_when_ready():
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # to this process: the supervisor

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=send_sigterm_when_ready, daemon=True).start()
    assert run_supervised([], POSITION, str(tmp_path), _python(child)) == 143
    assert signal.getsignal(signal.SIGTERM) == before  # the supervisor's handler is gone again


def test_the_training_dies_with_its_supervisor_and_does_not_supervise_again(tmp_path, capfd, monkeypatch):
    child = ("import ctypes, os\n"
             "from train.supervise import SUPERVISOR_VAR, enter_supervised_child\n"
             "assert enter_supervised_child() and SUPERVISOR_VAR not in os.environ\n"
             "sig = ctypes.c_int()\n"
             "ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG\n"
             "print('pdeathsig', sig.value)\n")
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    assert run_supervised([], POSITION, str(tmp_path), _python(child)) == 0
    if sys.platform.startswith("linux"):
        assert f"pdeathsig {int(signal.SIGKILL)}" in capfd.readouterr().out


def test_one_process_runs_have_no_supervisor(monkeypatch):
    monkeypatch.setattr("lora_jax.sharding.distributed._on_cloud_tpu_vm", lambda: False)
    assert job_position(LaunchSettings(), {}) is None
    assert job_position(LaunchSettings(), {"NUM_PROCESSES": "1"}) is None
    assert job_position(LaunchSettings(), {"JAX_COORDINATOR_ADDRESS": "h:1", "NUM_PROCESSES": "2",
                                           "PROCESS_ID": "1"}) == {"process_id": 1, "num_processes": 2,
                                                                   "coordinator_address": "h:1"}
