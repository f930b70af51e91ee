"""Running as several processes (hosts) with `jax.distributed`: start-up from the launcher's environment, the few
host-side collectives a training loop needs, and clean exits when a peer process is lost.

Start-up (`launch_plan`, `initialize`), in this order:
- explicit settings: coordinator address, process count and process id from `LaunchSettings` (the run config's
  `distributed` section) or the environment (`JAX_COORDINATOR_ADDRESS` / `COORDINATOR_ADDRESS`, `NUM_PROCESSES` /
  `JAX_NUM_PROCESSES`, `PROCESS_ID` / `JAX_PROCESS_ID`): a plain multi-node GPU (or CPU) job;
- SLURM (`srun`): auto-detected by JAX, but only when the step has more than one task (`salloc` then
  `python -m train` is one process);
- Open MPI (`mpirun`) with more than one rank, and Cloud TPU VMs (a TPU pod slice): auto-detected by JAX.
On CPU, collectives across processes use gloo.

Faults: JAX's own runtime aborts every process (SIGABRT, no word of what was lost) when a peer stops sending
heartbeats, and a collective with a dead peer fails at once with a gloo error. `PeerWatchdog` gives each process a
heartbeat of its own in the coordinator's key-value store; a peer whose heartbeat stalls for `peer_timeout_s`, or a
coordinator that no longer answers, ends this process with one line naming the lost process(es) and what the caller
says about the last checkpoint (`os._exit`: a lost peer can never join the exit barrier). JAX's heartbeat timeout is
set `HEARTBEAT_MARGIN_S` later, so that this line, not JAX's abort, is what a user sees. When process 0 (the
coordinator) itself dies, JAX aborts every other process at once, before any line of ours: `python -m train` runs a
multi-process job's training in a supervised child (train/supervise.py) that prints the line in its place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import threading
import time
from typing import Annotated, Callable, Iterator, Mapping

import jax
import numpy as np

from lora_jax.ranges import Ge, Gt, check_fields

log = logging.getLogger(__name__)

COORDINATOR_VARS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
COUNT_VARS = ("NUM_PROCESSES", "JAX_NUM_PROCESSES")
ID_VARS = ("PROCESS_ID", "JAX_PROCESS_ID")
HEARTBEAT_MARGIN_S = 30  # JAX's own heartbeat timeout is this much later than ours
PEER_FAULT_EXIT_CODE = 4  # a process exits with this when a peer was lost
BEAT_EVERY_S = 1.0
_KEY = "lora_jax/heartbeat"


@dataclasses.dataclass(frozen=True)
class LaunchSettings:
    """How this process joins a multi-process job; None fields come from the environment (see module docstring)."""

    coordinator_address: str | None = None  # host:port of process 0
    num_processes: Annotated[int | None, Ge(1)] = None
    process_id: Annotated[int | None, Ge(0)] = None
    peer_timeout_s: Annotated[float, Gt(0)] = 60.0  # a peer silent this long is lost: every process exits non-zero

    def __post_init__(self):
        check_fields(self, "LaunchSettings")


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    return next((env[n] for n in names if env.get(n)), None)


def _as_int(value: str | None, names: tuple[str, ...]) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{' / '.join(names)} must be an integer, got {value!r}") from None


def _slurm_tasks(env: Mapping[str, str]) -> int:
    return int(_first(env, ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")) or 1) if "SLURM_PROCID" in env else 1


def _on_cloud_tpu_vm() -> bool:
    try:  # the check jax's own TPU cluster detection starts with (a libtpu install on a Cloud TPU VM)
        from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm
    except ImportError:
        return False
    return bool(running_in_cloud_tpu_vm)


def launch_plan(settings: LaunchSettings = LaunchSettings(), env: Mapping[str, str] = os.environ) -> dict | None:
    """The keyword arguments of `jax.distributed.initialize` for this process, or None when it runs alone.

    Raises ValueError when an explicit launch is half-specified (a coordinator without a process count, ...)."""
    coordinator = settings.coordinator_address or _first(env, COORDINATOR_VARS)
    count = settings.num_processes or _as_int(_first(env, COUNT_VARS), COUNT_VARS)
    index = settings.process_id if settings.process_id is not None else _as_int(_first(env, ID_VARS), ID_VARS)
    cluster = _slurm_tasks(env) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    if coordinator or count is not None or index is not None:
        if count == 1:
            return None
        given = {"coordinator address (JAX_COORDINATOR_ADDRESS or distributed.coordinator_address)": coordinator,
                 "process count (NUM_PROCESSES or distributed.num_processes)": count,
                 "process id (PROCESS_ID or distributed.process_id)": index}
        missing = [what for what, value in given.items() if value is None]
        if missing and not cluster:  # inside SLURM / MPI, JAX fills in what is missing
            raise ValueError(f"a multi-process launch needs all three of coordinator address, process count and "
                             f"process id; missing: {', '.join(missing)}. Set them on every process (process 0 runs "
                             "the coordinator), or unset them to run as one process")
        if count is not None and index is not None and not 0 <= index < count:
            raise ValueError(f"process id {index} is outside 0..{count - 1} (process count {count})")
        return {"coordinator_address": coordinator, "num_processes": count, "process_id": index}
    if cluster or _on_cloud_tpu_vm():
        return {}  # jax.distributed.initialize() detects SLURM, Open MPI and TPU pods itself
    return None


def initialize(settings: LaunchSettings = LaunchSettings(), env: Mapping[str, str] = os.environ) -> bool:
    """Joins the multi-process job this process was launched into (see `launch_plan`); a no-op for one process or
    when already joined. Call it before anything touches a JAX device. Returns whether the job has several processes."""
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    plan = launch_plan(settings, env)
    if plan is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    jax.distributed.initialize(**plan, heartbeat_timeout_seconds=int(settings.peer_timeout_s + HEARTBEAT_MARGIN_S))
    log.info("jax.distributed: process %d of %d, %d local of %d devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


def is_main_process() -> bool:
    """Process 0 writes the plain files (logs, metrics, summaries) of a job."""
    return jax.process_index() == 0


def host_sum(value: float) -> float:
    """The sum of a host number over all processes (every process must call it, in the same order)."""
    if jax.process_count() == 1:
        return float(value)
    from jax.experimental import multihost_utils

    return float(np.sum(multihost_utils.process_allgather(np.asarray(value, np.float32))))  # x64 is off by default


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process (a collective: every process must call it, in the same order)."""
    return host_sum(1.0 if flag else 0.0) > 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def to_host(tree):
    """`tree` with every array as a numpy array holding its global value: arrays spread over other processes' devices
    are all-gathered (a collective: every process must call it with the same tree), the rest copied."""
    def fetch(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree_util.tree_map(fetch, tree)


def _client():
    from jax._src import distributed as jax_distributed  # the key-value store of the running job

    return jax_distributed.global_state.client


class PeerWatchdog:
    """Per process: beats a counter in the coordinator's key-value store and watches every peer's; a peer silent for
    `timeout_s`, or an unreachable coordinator, ends this process (exit code PEER_FAULT_EXIT_CODE) with one line
    naming the lost process(es) and `describe_fallback()` (e.g. the last checkpoint every process completed)."""

    def __init__(self, timeout_s: float, describe_fallback: Callable[[], str] = lambda: "",
                 before_exit: Callable[[], None] = lambda: None):
        self.timeout_s, self.describe_fallback, self.before_exit = timeout_s, describe_fallback, before_exit
        self.me, self.count = jax.process_index(), jax.process_count()
        self._client = _client()
        self._stop, self._exiting, self._beats = threading.Event(), threading.Lock(), 0
        self._seen = {p: (-1, time.monotonic()) for p in range(self.count) if p != self.me}
        self._thread = threading.Thread(target=self._run, name="lora_jax-peer-watchdog", daemon=True)

    def start(self) -> "PeerWatchdog":
        self._thread.start()
        return self

    def stop(self, finished: bool = True) -> None:
        """Stops watching; `finished` tells the peers this process ended on purpose (not lost)."""
        self._stop.set()
        self._thread.join(timeout=5)
        if finished:
            with contextlib.suppress(Exception):
                self._client.key_value_set(f"{_KEY}/{self.me}", "done", allow_overwrite=True)

    def lost_peers(self) -> list[int]:
        """The peers whose heartbeat has not moved for `timeout_s` (a peer that finished is not lost)."""
        now, lost = time.monotonic(), []
        for peer, (beat, since) in self._seen.items():
            try:
                value = self._client.key_value_try_get(f"{_KEY}/{peer}")
            except Exception:  # noqa: BLE001 - absent until the peer's first beat
                value = beat
            if value == "done":
                continue
            if value != beat:
                self._seen[peer] = (value, now)
            elif now - since > self.timeout_s:
                lost.append(peer)
        return lost

    def _run(self) -> None:
        while not self._stop.wait(BEAT_EVERY_S):
            self._beats += 1
            try:
                self._client.key_value_set(f"{_KEY}/{self.me}", str(self._beats), allow_overwrite=True)
            except Exception:  # noqa: BLE001 - the coordinator's store no longer answers: process 0 is gone
                self.exit_lost(None)
            lost = self.lost_peers()
            if lost:
                self.exit_lost(lost)

    def wait_for_lost_peer(self) -> None:
        """After a collective failed: waits (at most `timeout_s` plus a beat) for the watchdog to name the lost peer,
        then exits as it does; if none is found by then, exits naming none."""
        deadline = time.monotonic() + self.timeout_s + 2 * BEAT_EVERY_S
        while time.monotonic() < deadline:
            time.sleep(BEAT_EVERY_S)
        self.exit_lost([])

    def exit_lost(self, lost: list[int] | None) -> None:
        """Prints the one fault line and ends the process (PEER_FAULT_EXIT_CODE)."""
        if not self._exiting.acquire(blocking=False):
            return
        if lost is None:
            who = "process 0 (the coordinator) is lost: it no longer answers"
        elif lost:
            who = (f"process {', '.join(map(str, lost))} of {self.count} is lost: no heartbeat for "
                   f"{self.timeout_s:g} s (distributed.peer_timeout_s)")
        else:
            who = "a collective with the other processes failed and no peer could be named"
        fallback = self.describe_fallback()
        with contextlib.suppress(Exception):
            self.before_exit()
        print(fault_line(f"{who}; process {self.me} stops", fallback), file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(PEER_FAULT_EXIT_CODE)


def fault_line(what: str, fallback: str = "") -> str:
    """The one line a process prints when the job lost a process: what was lost, then what a re-run continues from."""
    # a progress bar may have left the cursor mid-line: the fault line starts its own
    return f"\nerror: {what}{'; ' + fallback if fallback else ''}"


@contextlib.contextmanager
def watch_peers(settings: LaunchSettings, describe_fallback: Callable[[], str] = lambda: "",
                before_exit: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Runs the body with a `PeerWatchdog` when the job has several processes: a peer lost during the body ends this
    process with one line (see PeerWatchdog; `before_exit` runs first, e.g. to release a lock); a collective that
    fails in the body waits for the watchdog to name the peer. A no-op for one process."""
    if jax.process_count() == 1:
        yield
        return
    watchdog = PeerWatchdog(settings.peer_timeout_s, describe_fallback, before_exit).start()
    try:
        yield
    except Exception as e:  # noqa: BLE001
        if _is_peer_failure(e):
            log.error("a collective failed (%s): waiting for the lost peer to be named", str(e).splitlines()[0][:200])
            watchdog.wait_for_lost_peer()
        watchdog.stop(finished=False)
        raise
    watchdog.stop()


def _is_peer_failure(error: BaseException) -> bool:
    text = str(error)
    return any(marker in text for marker in ("Gloo", "Connection closed", "Connection reset", "UNAVAILABLE",
                                            "heartbeat", "DEADLINE_EXCEEDED"))
