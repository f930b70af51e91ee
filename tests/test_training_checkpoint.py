"""TrainCheckpointer: keep-N, falling back past a damaged checkpoint, setting damaged ones aside, partial saves and a
full disk."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.training.checkpoint import CheckpointWriteError, TrainCheckpointer


def _state(v):
    return {"step": jnp.array(v, jnp.int32), "w": jnp.full((4, 3), float(v))}


def test_keeps_the_last_n_and_restores_the_newest(tmp_path):
    ckpt = TrainCheckpointer(str(tmp_path), keep=2, save_every=2, handle_sigterm=False)
    for step in range(1, 9):
        ckpt.maybe_save(step, _state(step), {"position": {"epoch": 0, "batch": step}})
    assert sorted(ckpt.manager.all_steps()) == [6, 8]
    state, extra, step = ckpt.restore_latest(_state(0))
    assert step == 8 and extra["position"]["batch"] == 8
    np.testing.assert_array_equal(state["w"], np.full((4, 3), 8.0))
    ckpt.close()


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, damage, caplog):
    ckpt = TrainCheckpointer(str(tmp_path), keep=3, save_every=1, handle_sigterm=False)
    for step in (1, 2):
        ckpt.maybe_save(step, _state(step), {"position": None})
    ckpt.close()
    latest = tmp_path / "2"
    files = [os.path.join(d, f) for d, _, fs in os.walk(latest) for f in fs if "state" in d and os.path.getsize(os.path.join(d, f)) > 0]
    for path in files:
        if damage == "truncate":
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 3)
        else:
            os.remove(path)
    again = TrainCheckpointer(str(tmp_path), keep=3, save_every=1, handle_sigterm=False)
    with caplog.at_level("ERROR"):
        state, _, step = again.restore_latest(_state(0))
    assert step == 1 and float(state["w"][0, 0]) == 1.0
    assert "checkpoint step 2" in caplog.text and "unreadable" in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["1", "2.corrupt"]  # set aside, kept for inspection
    assert again.maybe_save(2, _state(22), {"position": None})  # the step number is free again
    state, _, step = again.restore_latest(_state(0))
    assert step == 2 and float(state["w"][0, 0]) == 22.0
    again.close()


def test_no_checkpoint_means_none(tmp_path):
    assert TrainCheckpointer(str(tmp_path), handle_sigterm=False).restore_latest(_state(0)) is None


def _damage(directory):
    for d, _, files in os.walk(directory):
        for f in files:
            with open(os.path.join(d, f), "r+b") as fh:
                fh.truncate(0)


def test_zero_byte_checkpoint_is_set_aside_and_its_step_saved_again(tmp_path):
    ckpt = TrainCheckpointer(str(tmp_path), keep=3, save_every=1, handle_sigterm=False)
    for step in (1, 2, 3):
        ckpt.maybe_save(step, _state(step), {"position": None})
    ckpt.close()
    _damage(tmp_path / "3")
    again = TrainCheckpointer(str(tmp_path), keep=3, save_every=1, handle_sigterm=False)
    assert again.restore_latest(_state(0))[2] == 2
    assert again.steps() == [2, 1] and (tmp_path / "3.corrupt").is_dir()
    assert again.maybe_save(3, _state(3), {"position": None})  # before: skipped because step 3 "existed"
    assert again.steps() == [3, 2, 1]
    again.close()


def test_all_corrupt_checkpoints_never_cost_a_readable_one(tmp_path):
    ckpt = TrainCheckpointer(str(tmp_path), keep=2, save_every=1, handle_sigterm=False)
    for step in (5, 6):
        ckpt.maybe_save(step, _state(step), {"position": None})
    ckpt.close()
    for step in (5, 6):
        _damage(tmp_path / str(step))
    again = TrainCheckpointer(str(tmp_path), keep=2, save_every=1, handle_sigterm=False)
    assert again.restore_latest(_state(0)) is None  # retrain from step 0
    for step in range(1, 5):
        again.maybe_save(step, _state(step), {"position": None})
    # before: keep-2 kept the corrupt steps 5 and 6 and deleted every new, good one
    assert again.steps() == [4, 3]
    assert again.restore_latest(_state(0))[2] == 4
    assert {"5.corrupt", "6.corrupt"} <= set(os.listdir(tmp_path))
    again.close()


def test_retention_keeps_the_step_named_as_trusted(tmp_path):
    ckpt = TrainCheckpointer(str(tmp_path), keep=1, save_every=1, handle_sigterm=False)
    for step in range(1, 5):
        ckpt.maybe_save(step, _state(step), {"position": None}, also_keep=2 if step >= 2 else None)
    assert ckpt.steps() == [4, 2]
    ckpt.close()


def test_partial_saves_are_removed_at_start(tmp_path, caplog):
    ckpt = TrainCheckpointer(str(tmp_path), keep=2, save_every=1, handle_sigterm=False)
    ckpt.maybe_save(1, _state(1), {"position": None})
    ckpt.close()
    partial = tmp_path / "2.orbax-checkpoint-tmp-1234"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "data").write_bytes(b"half")
    with caplog.at_level("WARNING"):
        again = TrainCheckpointer(str(tmp_path), keep=2, save_every=1, handle_sigterm=False)
    assert not partial.exists() and "partial checkpoint save" in caplog.text
    assert again.steps() == [1]
    again.close()


def test_full_disk_gives_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt = TrainCheckpointer(str(tmp_path), keep=2, save_every=1, handle_sigterm=False)
    ckpt.maybe_save(1, _state(1), {"position": None})

    def disk_full(step, args, force):  # what TensorStore raises mid-write on a full disk, after creating its tmp dir
        (tmp_path / f"{step}.orbax-checkpoint-tmp-99" / "state").mkdir(parents=True)
        raise ValueError("RESOURCE_EXHAUSTED: Error writing local file \"/x/state/d/abc\": "
                         "[OS error 28: No space left on device] [source locations='tensorstore/...'] " + "x" * 200)

    monkeypatch.setattr(ckpt.manager, "save", disk_full)
    with pytest.raises(CheckpointWriteError) as err:
        ckpt.maybe_save(2, _state(2), {"position": None})
    message = str(err.value)
    assert "\n" not in message and len(message) < 400
    assert str(tmp_path) in message and "MiB" in message and "previous checkpoint (step 1) is intact" in message
    assert os.listdir(tmp_path) == ["1"]
    monkeypatch.undo()
    assert ckpt.restore_latest(_state(0))[2] == 1
    ckpt.close()
