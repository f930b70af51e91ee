"""The base fingerprint an adapter carries: any changed element of any frozen leaf changes it (and load_adapter
warns), shapes still error, sharded leaves give the same fingerprint, and adapters with the old fingerprint load."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import lora_jax
from lora_jax.checkpoints.adapter import base_fingerprint, legacy_fingerprint, load_adapter, save_adapter
from lora_jax.lora import LoraConfig
from lora_jax.tree import flatten_tree, unflatten_tree

CONFIG = LoraConfig(rank=2, alpha=4, targets=("q_proj",))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nudged(params, path, index=-1):
    """`params` with one element of leaf `path` moved to the next float32 (the smallest possible change)."""
    flat = {p: np.array(v) for p, v in flatten_tree(params).items()}
    leaf = flat[path].reshape(-1)
    leaf[index] = np.nextafter(leaf[index], np.float32(np.inf))
    return unflatten_tree(flat)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny):
    directory = str(tmp_path_factory.mktemp("fp") / "adapter")
    save_adapter(directory, lora_jax.init_lora(tiny[1], CONFIG, jax.random.PRNGKey(0)), CONFIG, base_model="tiny", base_params=tiny[1])
    return directory


def test_every_leaf_contributes(tiny):
    reference = base_fingerprint(tiny[1])
    for path in flatten_tree(tiny[1]):
        for index in (0, -1):
            assert base_fingerprint(_nudged(tiny[1], path, index))["values_sha256"] != reference["values_sha256"], path


def test_one_perturbed_encoder_weight_warns(saved, tiny, recwarn):
    load_adapter(saved, base_params=tiny[1])
    assert not [w for w in recwarn if "differ" in str(w.message)]  # the same base: silent
    other = _nudged(tiny[1], ("model", "encoder", "layers", "1", "fc2", "kernel"), index=1234)
    with pytest.warns(UserWarning, match="whose weights differ"):
        load_adapter(saved, base_params=other)


def test_every_encoder_weight_plus_one_warns(saved, tiny):
    other = jax.tree_util.tree_map_with_path(lambda p, x: x + 1.0 if len(p) > 1 and p[1].key == "encoder" else x, tiny[1])
    with pytest.warns(UserWarning, match="whose weights differ"):
        load_adapter(saved, base_params=other)


def test_old_fingerprint_is_checked_the_old_way_with_a_warning(tmp_path, saved, tiny):
    import shutil

    old = str(tmp_path / "old")
    shutil.copytree(saved, old)
    meta = json.load(open(os.path.join(old, "adapter_meta.json")))
    meta["base_fingerprint"] = legacy_fingerprint(tiny[1])  # what adapters saved before carry
    json.dump(meta, open(os.path.join(old, "adapter_meta.json"), "w"))
    with pytest.warns(UserWarning, match="old base fingerprint") as record:
        load_adapter(old, base_params=tiny[1])
    assert not [w for w in record if "differ" in str(w.message)]
    with pytest.warns(UserWarning, match="whose weights differ"):
        load_adapter(old, base_params=jax.tree_util.tree_map(lambda x: x * 1.5, tiny[1]))


SHARDED = """
import jax, numpy as np, lora_jax
from lora_jax import sharding
from lora_jax.checkpoints.adapter import base_fingerprint
_, params = lora_jax.load_pretrained("tests/fixtures/tiny-bart/model")
mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4))
sharded = sharding.put_sharded(jax.tree_util.tree_map(np.asarray, params), sharding.tree_shardings(params, mesh, min_size=64))
assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(sharded))
print(base_fingerprint(sharded) == base_fingerprint(params))
"""


def test_sharded_base_gives_the_same_fingerprint():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SHARDED], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"


def test_a_quantised_base_has_a_fingerprint_that_sees_its_codes(tiny):
    import jax

    from lora_jax.checkpoints.adapter import base_fingerprint

    quantised = lora_jax.quantize_base(tiny[1], "nf4")
    before = base_fingerprint(quantised)
    kernel = quantised["model"]["encoder"]["layers"]["0"]["fc1"]["kernel"]
    codes = jax.tree_util.tree_leaves(kernel)[0]
    nudged = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(kernel),
                                          [codes.at[0].set(codes[0] ^ 1)] + jax.tree_util.tree_leaves(kernel)[1:])
    quantised["model"]["encoder"]["layers"]["0"]["fc1"]["kernel"] = nudged
    after = base_fingerprint(quantised)
    assert before["shapes_sha256"] == after["shapes_sha256"] and before["values_sha256"] != after["values_sha256"]
