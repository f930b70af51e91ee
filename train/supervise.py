"""A multi-process job's `python -m train` runs its training in a child process that it supervises.

Why: when process 0 (the coordinator) dies, JAX's runtime aborts every other process at once (SIGABRT: "Terminating
process because the JAX distributed service detected fatal errors"), before the peer watchdog
(lora_jax.sharding.distributed.PeerWatchdog) can say what was lost. The supervisor outlives that abort and prints the
watchdog's kind of line in its place: which process was lost and the last checkpoint every process completed.

The supervisor stays light: it never initialises a JAX backend or jax.distributed (it only reads the launch plan and
the checkpoint directory). The child gets PR_SET_PDEATHSIG=SIGKILL, so a supervisor killed with kill -9 (or a lost
host) never leaves an orphan training on; SIGTERM and SIGINT sent to the supervisor are forwarded to the child, and
the supervisor exits with the child's exit code. A one-process run has no supervisor.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys

from lora_jax.sharding.distributed import PEER_FAULT_EXIT_CODE, LaunchSettings, fault_line, launch_plan
from lora_jax.training.checkpoint import last_complete_step

SUPERVISOR_VAR = "LORA_JAX_SUPERVISOR_PID"  # set in the child's environment: the supervisor's pid
PR_SET_PDEATHSIG = 1  # linux/prctl.h
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def resume_hint(checkpoints: str) -> str:
    """What a re-run continues from, for the line a process prints when the job lost a process."""
    step = last_complete_step(checkpoints)
    if step is None:
        return "no checkpoint was completed by every process: re-running the same command starts over"
    return (f"the last checkpoint every process completed is step {step} in {checkpoints}: re-run the same command "
            "on every process to resume from it")


def enter_supervised_child(env=os.environ) -> bool:
    """In the child of a supervisor: asks the kernel to SIGKILL this process when the supervisor dies (Linux), and
    removes the marker so that nothing this process starts counts as supervised. Returns whether this process is a
    supervised child (False: nothing was done)."""
    parent = env.pop(SUPERVISOR_VAR, None)
    if parent is None:
        return False
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != int(parent):  # the supervisor died before the request took effect: end as it would have
        os._exit(128 + signal.SIGKILL)
    return True


def job_position(settings: LaunchSettings, env=os.environ) -> dict | None:
    """{"process_id", "num_processes", "coordinator_address"} of this process when it is one process of a
    multi-process job (None values: left to JAX's cluster detection), else None. A half-specified launch is None too:
    the training itself then reports it."""
    try:
        plan = launch_plan(settings, env)
    except ValueError:
        return None
    if plan is None:
        return None
    rank = next((env[v] for v in ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK") if env.get(v)), None)
    size = next((env[v] for v in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE") if env.get(v)), None)
    return {"process_id": plan.get("process_id", rank), "num_processes": plan.get("num_processes", size),
            "coordinator_address": plan.get("coordinator_address")}


def abort_line(position: dict, checkpoints: str) -> str:
    """The one line printed when JAX aborted the training child (the coordinator or the runtime failed)."""
    me, count, address = (position[k] for k in ("process_id", "num_processes", "coordinator_address"))
    this = f"process {'?' if me is None else me} of {'?' if count is None else count}"
    coordinator = f"process 0, {address}" if address else "process 0"
    return fault_line(f"{this}: the job's coordinator ({coordinator}) or JAX's distributed runtime failed (JAX aborted "
                      "this process)", resume_hint(checkpoints))


def run_supervised(argv: list[str], position: dict, checkpoints: str,
                   command: tuple[str, ...] = (sys.executable, "-m", "train")) -> int:
    """Runs `<command> <argv>` (python -m train ...) as a child and waits for it -> the exit code this process should
    end with: the child's (128 + N when signal N ended it), or PEER_FAULT_EXIT_CODE with `abort_line` when JAX
    aborted it."""
    child: subprocess.Popen | None = None
    pending: list[int] = []  # signals that came before the child existed

    def forward(signum, _frame):
        if child is None:
            pending.append(signum)
            return
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    # installed before the child starts: a SIGTERM in between must not end the supervisor (and, through PDEATHSIG,
    # the child) without the child's checkpoint-and-stop
    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        child = subprocess.Popen([*command, *argv], env={**os.environ, SUPERVISOR_VAR: str(os.getpid())})
        for signum in pending:
            child.send_signal(signum)
        returncode = child.wait()  # PEP 475: the wait resumes after a forwarded signal
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if returncode == -signal.SIGABRT:
        print(abort_line(position, checkpoints), file=sys.stderr, flush=True)
        return PEER_FAULT_EXIT_CODE
    return returncode if returncode >= 0 else 128 - returncode
