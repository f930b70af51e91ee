"""Real multi-process runs for tests: N processes x D simulated CPU devices on 127.0.0.1, joined by
jax.distributed (gloo collectives), each with a hard timeout.

    procs = launch([sys.executable, "-m", "train", "--config", cfg], processes=2, devices=2)
    results = wait_all(procs, timeout=600)   # [(returncode, stdout, stderr), ...] in process order
"""

from __future__ import annotations

import os
import socket
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port nothing listens on now (the coordinator binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(index: int, processes: int, devices: int, port: int | None, extra: dict | None = None) -> dict:
    """The environment of process `index` of `processes`, each with `devices` simulated CPU devices."""
    launcher = ("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR", "COORDINATOR_ADDRESS", "NUM_PROCESSES",
                "JAX_NUM_PROCESSES", "PROCESS_ID", "JAX_PROCESS_ID")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}  # this test's launch only
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    if processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", NUM_PROCESSES=str(processes), PROCESS_ID=str(index))
    env.update(extra or {})
    return env


def launch(cmd: list[str], processes: int, devices: int, extra_env: dict | None = None,
           log_dir: str | None = None) -> list[subprocess.Popen]:
    """Starts `cmd` as `processes` processes of one job (a fresh coordinator port), stdout/stderr to files in
    `log_dir` (or pipes)."""
    port = free_port() if processes > 1 else None
    procs = []
    for i in range(processes):
        env = process_env(i, processes, devices, port, extra_env)
        if log_dir:
            out = open(os.path.join(log_dir, f"process{i}.out"), "w")
            err = open(os.path.join(log_dir, f"process{i}.err"), "w")
        else:
            out = err = subprocess.PIPE
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
    """Waits for every process (killing all of them past `timeout` seconds) -> [(returncode, stdout, stderr)]."""
    deadline = time.monotonic() + timeout
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(deadline - time.monotonic(), 1))
            results.append((p.returncode, out or "", err or ""))
    except subprocess.TimeoutExpired:
        kill_all(procs)
        raise
    return results


def kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()
