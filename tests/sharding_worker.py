"""Runs in a subprocess with N simulated CPU devices (XLA_FLAGS set by the caller) for tests/test_sharding.py.

    python -m tests.sharding_worker train OUT_DIR        # 1 device, data=8, data=2 x fsdp=4: 5 steps each
    python -m tests.sharding_worker restore CKPT EXPECTED.npz [data fsdp] [SAVE_TO]
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import traverse_util

import lora_jax
from lora_jax import sharding
from lora_jax.lora import LoraConfig
from tests.conftest import MODEL_DIR

CONFIG = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))
STEPS = 5


def setup():
    import dataclasses

    model, params = lora_jax.load_pretrained(MODEL_DIR)
    model = lora_jax.BartForConditionalGeneration(dataclasses.replace(model.config, dropout=0.0))
    ref = np.load("tests/fixtures/tiny-bart/reference.npz")
    batch = {k: np.tile(ref[k].astype(np.int32), (2, 1)) for k in ("input_ids", "attention_mask", "decoder_input_ids", "labels")}
    adapted = lora_jax.init_lora(params, CONFIG, jax.random.PRNGKey(0))
    return model, adapted, batch


def new_state(adapted):
    return lora_jax.create_train_state(adapted, CONFIG, lora_jax.lora_optimizer(optax.adamw(1e-3), CONFIG))


def run(model, adapted, batch, mesh=None, min_size=0):
    state = new_state(adapted)
    if mesh is None:
        step = lora_jax.make_train_step(model, CONFIG)
        put = lambda b: b
    else:
        state, shardings = sharding.shard_state(state, mesh, min_size=min_size)
        step = lora_jax.make_train_step(model, CONFIG, shardings=(shardings, sharding.batch_sharding(mesh)))
        put = lambda b: sharding.shard_batch(b, mesh)
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, put(batch), jax.random.PRNGKey(1))
        losses.append(float(metrics["loss"]))
    return state, losses


def flat_np(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


def train(out_dir):
    model, adapted, batch = setup()
    single, single_losses = run(model, adapted, batch)
    result = {"devices": jax.device_count(), "single_losses": single_losses}
    for name, mesh_cfg in (("data8", sharding.MeshConfig(data=8, fsdp=1)), ("data2_fsdp4", sharding.MeshConfig(data=2, fsdp=4))):
        mesh = sharding.make_mesh(mesh_cfg)
        state, losses = run(model, adapted, batch, mesh)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(single.trainable), jax.tree_util.tree_leaves(state.trainable)))
        result[name] = {"losses": losses, "max_adapter_diff": diff}
        if name == "data2_fsdp4":
            per_device = sharding.bytes_per_device(state.frozen)
            total = sum(x.nbytes for x in jax.tree_util.tree_leaves(state.frozen))
            result[name]["frozen_bytes_per_device"] = sorted(per_device.values())
            result[name]["frozen_bytes_total"] = total
            result[name]["frozen_specs_sample"] = str(state.frozen["model"]["encoder"]["layers"]["0"]["fc1"]["kernel"].sharding.spec)
            ckpt = ocp.StandardCheckpointer()
            ckpt.save(f"{out_dir}/ckpt8", {"trainable": state.trainable, "opt_state": state.opt_state})
            ckpt.wait_until_finished()
            np.savez(f"{out_dir}/expected.npz", **flat_np(state.trainable))
            _, loaded = lora_jax.load_pretrained(MODEL_DIR, mesh=mesh, min_shard_size=0)
            _, host = lora_jax.load_pretrained(MODEL_DIR)
            result["sharded_load"] = {
                "max_diff": max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                                zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(host))),
                "bytes_per_device": sorted(sharding.bytes_per_device(loaded).values()),
                "total": sum(x.nbytes for x in jax.tree_util.tree_leaves(loaded)),
            }
    print(json.dumps(result))


def restore(ckpt_dir, expected, data=1, fsdp=1, save_to=None):
    model, adapted, _ = setup()
    mesh = sharding.make_mesh(sharding.MeshConfig(data=int(data), fsdp=int(fsdp)))
    state = new_state(adapted)
    target = {"trainable": state.trainable, "opt_state": state.opt_state}
    shardings = sharding.tree_shardings(target, mesh, min_size=0)
    abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, shardings)
    restored = ocp.StandardCheckpointer().restore(ckpt_dir, abstract)
    got = flat_np(restored["trainable"])
    want = dict(np.load(expected))
    diff = max(float(np.abs(got[k] - want[k]).max()) for k in want)
    devices = sorted({d.id for leaf in jax.tree_util.tree_leaves(restored) for d in leaf.sharding.device_set})
    if save_to:
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(save_to, restored)
        ckpt.wait_until_finished()
    print(json.dumps({"devices": jax.device_count(), "max_diff": diff, "keys": len(want), "used_devices": devices}))


if __name__ == "__main__":
    {"train": train, "restore": restore}[sys.argv[1]](*sys.argv[2:])
