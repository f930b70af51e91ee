"""Data parallel and FSDP on 8 simulated CPU devices (subprocesses with XLA_FLAGS), and sharded checkpoints that move
between 8 devices and 1."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lora_jax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(devices, *args):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "tests.sharding_worker", *map(str, args)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    return out, _worker(8, "train", out)


@pytest.mark.parametrize("mesh", ["data8", "data2_fsdp4"])
def test_sharded_training_matches_one_device(trained, mesh):
    _, result = trained
    assert result["devices"] == 8
    np.testing.assert_allclose(result[mesh]["losses"], result["single_losses"], atol=1e-5, rtol=0)
    assert result[mesh]["max_adapter_diff"] < 1e-5


def test_fsdp4_holds_a_quarter_of_the_frozen_weights_per_device(trained):
    r = trained[1]["data2_fsdp4"]
    assert len(r["frozen_bytes_per_device"]) == 8
    fractions = np.array(r["frozen_bytes_per_device"]) / r["frozen_bytes_total"]
    assert np.all(fractions < 0.27) and np.all(fractions >= 0.25), fractions
    assert "fsdp" in r["frozen_specs_sample"]


def test_checkpoint_loads_straight_into_its_sharding(trained):
    r = trained[1]["sharded_load"]
    assert r["max_diff"] == 0.0
    assert max(r["bytes_per_device"]) <= 0.27 * r["total"]  # each device received only its shard


def test_checkpoint_saved_on_8_devices_restores_on_1_and_back(trained):
    out, _ = trained
    on_one = _worker(1, "restore", out / "ckpt8", out / "expected.npz", 1, 1, out / "ckpt1")
    assert on_one["devices"] == 1 and on_one["used_devices"] == [0] and on_one["max_diff"] == 0.0
    on_eight = _worker(8, "restore", out / "ckpt1", out / "expected.npz", 2, 4)
    assert on_eight["devices"] == 8 and len(on_eight["used_devices"]) == 8 and on_eight["max_diff"] == 0.0


@pytest.mark.parametrize(
    "shape,fsdp,spec",
    [((768, 3072), 4, (None, "fsdp")), ((50265, 768), 4, (None, "fsdp")),
     ((50264, 768), 4, ("fsdp", None)), ((768,), 4, ()), ((1024, 1024), 1, ())],
)
def test_fsdp_rule(shape, fsdp, spec):
    assert tuple(sharding.fsdp_spec(shape, fsdp)) == spec


def test_mesh_must_fit_the_devices():
    with pytest.raises(ValueError, match="data x fsdp must equal"):
        sharding.make_mesh(sharding.MeshConfig(data=3, fsdp=1))
    with pytest.raises(ValueError, match="unknown mesh axis"):
        sharding.MeshConfig.from_dict({"model": 2})
