"""TrainCheckpointer: keep-N, and falling back past a damaged checkpoint."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.training.checkpoint import TrainCheckpointer


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
    again.close()


def test_no_checkpoint_means_none(tmp_path):
    assert TrainCheckpointer(str(tmp_path), handle_sigterm=False).restore_latest(_state(0)) is None
