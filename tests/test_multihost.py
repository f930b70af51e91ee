"""`python -m train` as a real multi-process job: 2 processes x 2 simulated CPU devices on 127.0.0.1 (jax.distributed,
gloo), against the same run as 1 process x 4 devices. Dropout is on in every run (model dropout 0.1, LoRA dropout 0.1).

Tolerances: train losses of 2x2 and 1x4 agree to 1e-6 per step (gloo's cross-process sums may add in another order;
measured ~1e-7); eval loss to 1e-6; ROUGE and predictions exactly; the adapters to 1e-5. A 2x2 run resumed after
kills equals the uninterrupted 2x2 run exactly.
"""

import json
import os
import shutil
import signal
import sys
import time

import numpy as np
import pytest

from lora_jax.sharding.distributed import PEER_FAULT_EXIT_CODE, LaunchSettings, launch_plan
from lora_jax.training.checkpoint import last_complete_step
from tests.conftest import FIXTURE, MODEL_DIR
from tests.multihost import kill_all, launch, wait_all

STEPS, SAVE_EVERY, PEER_TIMEOUT = 20, 5, 10
RUN_TIMEOUT = 600  # hard limit on any one launch (every process is killed past it)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A directory holding the data and config of every run of this module."""
    d = tmp_path_factory.mktemp("multihost")
    texts = json.load(open(os.path.join(FIXTURE, "reference_texts.json")))
    rows = list(zip(texts["sources"], texts["targets"]))
    with open(d / "train.jsonl", "w") as f:
        for i in range(6):
            f.writelines(json.dumps({"source": f"{s} ({i})", "target": t}) + "\n" for s, t in rows)
    with open(d / "eval.jsonl", "w") as f:
        f.writelines(json.dumps({"source": s, "target": t}) + "\n" for s, t in rows)
    cfg = {
        "model": {"checkpoint": MODEL_DIR},  # its config has dropout 0.1
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.1},
        "data": {"train_files": str(d / "train.jsonl"), "eval_files": str(d / "eval.jsonl"), "max_source_length": 64,
                 "max_target_length": 16},
        "optim": {"learning_rate": 0.005, "warmup_steps": 2},
        "train": {"batch_size": 4, "eval_batch_size": 4, "num_steps": STEPS, "eval_every": 10, "save_every": SAVE_EVERY,
                  "keep_checkpoints": 4, "log_every": 1},
        "eval": {"rouge_before": False, "num_beams": 2, "max_new_tokens": 12},
    }
    (d / "run.json").write_text(json.dumps(cfg))  # JSON is YAML
    return d


def _train_cmd(work, name, *extra):
    return [sys.executable, "-m", "train", "--config", str(work / "run.json"), "--set",
            f"train.output_dir={work / name}", *extra]


def _run(work, name, processes, devices, *extra):
    """Runs a job to its end -> [(returncode, stdout, stderr)] per process, every one asserted successful."""
    results = wait_all(launch(_train_cmd(work, name, *extra), processes, devices), RUN_TIMEOUT)
    for i, (rc, _, err) in enumerate(results):
        assert rc == 0, f"process {i}: rc {rc}\n{err[-3000:]}"
    return results


def _records(out_dir, split="train"):
    """{step: record} of metrics.jsonl (a replayed step after a resume overwrites the killed run's record)."""
    out = {}
    for line in open(os.path.join(out_dir, "metrics.jsonl")):
        r = json.loads(line)
        if r["split"] == split:
            out[r["step"]] = r
    return out


def _wait_for_step(out_dir, step, procs, timeout=RUN_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(os.path.join(out_dir, "metrics.jsonl")) and max(_records(out_dir), default=0) >= step:
            return
        assert all(p.poll() is None for p in procs), "a process ended before the step was reached"
        time.sleep(0.2)
    kill_all(procs)
    raise TimeoutError(f"step {step} not reached")


@pytest.fixture(scope="module")
def single(work):
    _run(work, "single", 1, 4)
    return work / "single"


@pytest.fixture(scope="module")
def double(work):
    results = _run(work, "double", 2, 2)
    return work / "double", results


def test_two_processes_train_the_one_process_run(single, double):
    out, results = double
    assert "jax.distributed: process 1 of 2, 2 local of 4 devices" in results[1][2]
    one, two = _records(single), _records(out)
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    diffs = [abs(one[s]["loss"] - two[s]["loss"]) for s in one]
    assert max(diffs) <= 1e-6, diffs
    # tokens/s sums every process's own rows: the same order as the 1-process job, not half of it
    assert all(r["tokens_per_s"] > 0 for r in two.values())


def test_eval_loss_and_rouge_equal_the_one_process_run(single, double):
    one, two = (json.loads((d / "summary.json").read_text()) for d in (single, double[0]))
    assert abs(one["eval_loss"] - two["eval_loss"]) <= 1e-6
    assert one["rouge_after"] == two["rouge_after"]
    assert (single / "predictions.jsonl").read_text() == (double[0] / "predictions.jsonl").read_text()
    evals_one, evals_two = _records(single, "eval"), _records(double[0], "eval")
    assert sorted(evals_one) == sorted(evals_two) == [10, 20]
    assert all(abs(evals_one[s]["loss"] - evals_two[s]["loss"]) <= 1e-6 for s in evals_one)


def test_adapter_summary_and_peft_export_are_written_once(work, single, double):
    import lora_jax
    from safetensors.numpy import load_file

    out, results = double
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == STEPS and summary["saved"]["bytes"] > 0
    assert not [n for n in os.listdir(out) if ".tmp" in n], os.listdir(out)  # no leftover of the collective save
    assert not (out / ".lock").exists()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len([ln for ln in lines if json.loads(ln)["split"] == "train"]) == STEPS  # one writer
    _, base = lora_jax.load_pretrained(MODEL_DIR)
    a1, config, _ = lora_jax.load_adapter(str(single / "adapter"), base_params=base)
    a2, config2, _ = lora_jax.load_adapter(str(out / "adapter"), base_params=base)
    assert config == config2
    for x, y in zip(*(jax_leaves(a) for a in (a1, a2))):
        np.testing.assert_allclose(x, y, atol=1e-5)
    # the PEFT export, run as a 2-process job too: process 0 writes it, once
    export = [sys.executable, "-m", "train.export", "--base", MODEL_DIR]
    exported = wait_all(launch(export + ["--adapter", str(out / "adapter"), "--peft", str(work / "peft2")], 2, 2),
                        RUN_TIMEOUT)
    assert [rc for rc, _, _ in exported] == [0, 0], exported[0][2][-2000:] + exported[1][2][-2000:]
    assert sum('"written"' in o for _, o, _ in exported) == 1
    [(rc, _, err)] = wait_all(launch(export + ["--adapter", str(single / "adapter"), "--peft", str(work / "peft1")],
                                     1, 4), RUN_TIMEOUT)
    assert rc == 0, err[-2000:]
    t1, t2 = (load_file(str(work / p / "adapter_model.safetensors")) for p in ("peft1", "peft2"))
    assert sorted(t1) == sorted(t2) and t1
    for k in t1:
        np.testing.assert_allclose(t1[k], t2[k], atol=1e-5)
    assert json.loads((work / "peft1" / "adapter_config.json").read_text()) == \
        json.loads((work / "peft2" / "adapter_config.json").read_text())


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_faults_end_cleanly_and_the_rerun_resumes_exactly(work, double):
    """kill -9 of process 1 -> process 0 exits non-zero within the peer timeout, naming process 1 and the last
    complete checkpoint; a checkpoint not every process finished is never used; the re-run resumes; kill -9 of
    both -> the next re-run resumes again and ends with the uninterrupted run's losses, exactly."""
    name, out = "faults", work / "faults"
    cmd = _train_cmd(work, name, f"--set=distributed.peer_timeout_s={PEER_TIMEOUT}")
    procs = launch(cmd, 2, 2)
    _wait_for_step(out, SAVE_EVERY + 2, procs)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    rc, _, err = wait_all(procs[:1], RUN_TIMEOUT)[0]
    elapsed = time.monotonic() - killed
    kill_all(procs)
    assert rc == PEER_FAULT_EXIT_CODE, err[-3000:]
    assert elapsed < PEER_TIMEOUT + 20, elapsed  # the bound, plus a heartbeat and a loaded machine's slack
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    line = lines[0]
    step = last_complete_step(str(out / "checkpoints"))
    assert step is not None and step % SAVE_EVERY == 0
    assert "process 1 of 2 is lost" in line and f"step {step} in {out / 'checkpoints'}" in line, line
    assert not (out / ".lock").exists()  # released on the way out
    # A save that not every process finished is a temporary directory: never resumed from, cleared at start.
    partial = out / "checkpoints" / f"{STEPS - 1}.orbax-checkpoint-tmp-1234"
    partial.mkdir()

    procs = launch(cmd, 2, 2)
    _wait_for_step(out, 2 * SAVE_EVERY + 2, procs)
    assert not partial.exists()
    kill_all(procs)  # kill -9 of both
    resumed_from = last_complete_step(str(out / "checkpoints"))
    assert resumed_from >= 2 * SAVE_EVERY

    results = wait_all(launch(cmd, 2, 2), RUN_TIMEOUT)
    assert [r[0] for r in results] == [0, 0], results[0][2][-3000:]
    assert f"resumed from step {resumed_from}" in results[0][2]
    assert f"resumed from step {resumed_from}" in results[1][2]
    want, got = _records(double[0]), _records(out)
    assert {s: got[s]["loss"] for s in want} == {s: want[s]["loss"] for s in want}


def _children(pid):
    """The pids of process `pid`'s children (Linux)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _gone(pid, timeout=30):
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.2)
    return not os.path.exists(f"/proc/{pid}")


def test_loss_of_the_coordinator_ends_the_others_with_one_line_and_the_rerun_resumes(work):
    """kill -9 of process 0 (its supervisor: the training child dies with it, as on a lost host) -> JAX aborts process
    1's training at once; process 1 still exits non-zero within a bound with one line naming process 0 and the last
    complete checkpoint, and the re-run of both resumes from it."""
    name, out = "coordinator", work / "coordinator"
    cmd = _train_cmd(work, name, f"--set=distributed.peer_timeout_s={PEER_TIMEOUT}")
    procs = launch(cmd, 2, 2)
    _wait_for_step(out, SAVE_EVERY + 2, procs)
    [trainer] = _children(procs[0].pid)  # a multi-process job's training runs in a supervised child
    procs[0].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    rc, _, err = wait_all(procs[1:], RUN_TIMEOUT)[0]
    elapsed = time.monotonic() - killed
    kill_all(procs)
    assert _gone(trainer), "process 0's training outlived its supervisor (PR_SET_PDEATHSIG)"
    assert rc == PEER_FAULT_EXIT_CODE, err[-3000:]
    assert elapsed < PEER_TIMEOUT + 20, elapsed
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    step = last_complete_step(str(out / "checkpoints"))
    assert step is not None and step % SAVE_EVERY == 0
    assert "process 0" in lines[0] and f"step {step} in {out / 'checkpoints'}" in lines[0], lines[0]

    results = wait_all(launch(cmd, 2, 2), RUN_TIMEOUT)
    assert [r[0] for r in results] == [0, 0], results[0][2][-3000:] + results[1][2][-3000:]
    assert all(f"resumed from step {step}" in r[2] for r in results)


def _copy_until(src, dst, step):
    """A copy of run `src` whose checkpoints stop at `step` (as if it had been stopped there)."""
    shutil.copytree(src, dst)
    for name in os.listdir(dst / "checkpoints"):
        if name.isdigit() and int(name) > step:
            shutil.rmtree(dst / "checkpoints" / name)
    for name in ("summary.json", "adapter"):
        shutil.rmtree(dst / name, ignore_errors=True) if name == "adapter" else (dst / name).unlink()


def test_elastic_resume_on_another_host_count_and_refusal_of_another_layout(work, double):
    """The 2x2 run's step-10 checkpoint resumed by 1 process x 4 devices gives the 2x2 run's losses; resumed by
    1 x 2 devices (other dropout masks) it is refused, naming the layout."""
    _copy_until(double[0], work / "elastic", 10)
    _run(work, "elastic", 1, 4)
    want, got = _records(double[0]), _records(work / "elastic")
    assert max(abs(want[s]["loss"] - got[s]["loss"]) for s in range(11, STEPS + 1)) <= 1e-6
    _copy_until(double[0], work / "layout", 10)
    [(rc, _, err)] = wait_all(launch(_train_cmd(work, "layout"), 1, 2), RUN_TIMEOUT)
    assert rc == 2 and "layout" in err and "batch_shards" in err, err[-2000:]


@pytest.mark.parametrize("env, settings, want", [
    ({}, {}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, {}, None),  # salloc, then one process
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "2"}, {}, {}),  # srun: JAX's SLURM detection
    ({"OMPI_COMM_WORLD_SIZE": "2"}, {}, {}),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "NUM_PROCESSES": "2", "PROCESS_ID": "1"}, {},
     {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}),
    ({"NUM_PROCESSES": "1"}, {}, None),
    ({}, {"coordinator_address": "h:2", "num_processes": 4, "process_id": 0},
     {"coordinator_address": "h:2", "num_processes": 4, "process_id": 0}),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "NUM_PROCESSES": "2", "PROCESS_ID": "1"}, {"process_id": 0},
     {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0}),  # --set beats the environment
])
def test_launch_plan(env, settings, want, monkeypatch):
    monkeypatch.setattr("lora_jax.sharding.distributed._on_cloud_tpu_vm", lambda: False)
    assert launch_plan(LaunchSettings(**settings), env) == want


def test_launch_plan_on_a_tpu_vm_lets_jax_detect_the_pod(monkeypatch):
    monkeypatch.setattr("lora_jax.sharding.distributed._on_cloud_tpu_vm", lambda: True)
    assert launch_plan(LaunchSettings(), {}) == {}


@pytest.mark.parametrize("env, message", [
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "missing: process count (NUM_PROCESSES"),
    ({"NUM_PROCESSES": "2", "PROCESS_ID": "0"}, "missing: coordinator address"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "NUM_PROCESSES": "2", "PROCESS_ID": "2"}, "process id 2 is outside 0..1"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "NUM_PROCESSES": "two", "PROCESS_ID": "0"}, "must be an integer"),
])
def test_half_specified_launches_are_refused(env, message, monkeypatch):
    monkeypatch.setattr("lora_jax.sharding.distributed._on_cloud_tpu_vm", lambda: False)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        launch_plan(LaunchSettings(), env)
