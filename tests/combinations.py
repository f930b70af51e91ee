"""The feature-combination matrix (issue 24): options that can meet in a run, an all-pairs covering set of rows, and
one short library run per row. Used by tests/test_combinations.py in process and, for the rows on a 2-device mesh,
by `python -m tests.combinations ROW...` in a subprocess with 2 simulated CPU devices.

A row runs: init (the base untied, cast or quantised as the row says) -> 2 jitted train steps (finite loss) -> the
adapter saved and reloaded (equal) -> merged logits equal to unmerged ones -> PEFT export / import (equal) -> with
`stack`, served from a mixed-adapter stack beside another adapter (the row's slot gives the row's logits).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from lora_jax import sharding
from lora_jax.models.tying import LM_HEAD, SHARED
from lora_jax.tree import flatten_tree, unflatten_tree

FACTORS = {
    "layers": ("unrolled", "scanned", "prestacked"),
    "base": ("f32", "bf16", "int8", "nf4"),
    "variant": ("lora", "dora", "pissa", "olora"),
    "scale": ("plain", "rslora", "patterns"),
    "optim": ("adamw", "loraplus"),
    "extra": ("none", "save_head", "save_embed", "lora_embed"),  # modules_to_save lm_head / embed_tokens; LoRA on embeddings
    "head": ("tied", "untied"),
    "accum": (1, 2),
    "remat": (None, "dots", "full"),
    "stack": (False, True),  # served from a mixed-adapter stack beside another adapter
    "mesh": (1, 2),  # devices (data parallel 2 in a subprocess)
}
RESIDUAL = ("pissa", "olora")
# Pairs that cannot meet, each refused up front (tests/test_combinations.py::test_refused_pairs checks the message).
REFUSED = {
    (("variant", "pissa"), ("base", "int8")), (("variant", "pissa"), ("base", "nf4")),
    (("variant", "olora"), ("base", "int8")), (("variant", "olora"), ("base", "nf4")),
    (("variant", "dora"), ("extra", "lora_embed")), (("variant", "pissa"), ("extra", "lora_embed")),
    (("variant", "olora"), ("extra", "lora_embed")), (("extra", "lora_embed"), ("head", "tied")),
    (("stack", True), ("variant", "dora")), (("stack", True), ("extra", "save_head")),
    (("stack", True), ("extra", "save_embed")), (("stack", True), ("extra", "lora_embed")),
}


def pair_ok(a: tuple, b: tuple) -> bool:
    return (a, b) not in REFUSED and (b, a) not in REFUSED


def row_ok(row: dict) -> bool:
    items = list(row.items())
    return all(pair_ok(a, b) for a, b in itertools.combinations(items, 2))


def covering_rows(seed: int = 0, candidates: int = 30) -> list[dict]:
    """A pairwise covering array over FACTORS without REFUSED pairs (greedy, AETG-style, deterministic): every allowed
    pair of values of two factors is in at least one row."""
    rng = random.Random(seed)
    names = list(FACTORS)
    uncovered = {((f, v), (g, w)) for f, g in itertools.combinations(names, 2) for v in FACTORS[f] for w in FACTORS[g]
                 if pair_ok((f, v), (g, w))}
    rows = []
    while uncovered:
        best, gain = None, -1
        for _ in range(candidates):
            row = _candidate(rng, names, sorted(uncovered, key=repr)[rng.randrange(len(uncovered))], uncovered)
            if row is None:
                continue
            new = sum(((f, row[f]), (g, row[g])) in uncovered for f, g in itertools.combinations(names, 2))
            if new > gain:
                best, gain = row, new
        if best is None or gain == 0:
            raise RuntimeError(f"pairs no valid row covers: {sorted(uncovered, key=repr)[:3]}")
        uncovered -= {((f, best[f]), (g, best[g])) for f, g in itertools.combinations(names, 2)}
        rows.append(best)
    return rows


def _candidate(rng, names, pair, uncovered) -> dict | None:
    row = dict(pair)
    for f in rng.sample(names, len(names)):
        if f in row:
            continue
        options = [v for v in FACTORS[f] if row_ok({**row, f: v})]
        if not options:
            return None
        score = lambda v: sum(((f, v), (g, row[g])) in uncovered or ((g, row[g]), (f, v)) in uncovered for g in row)
        top = max(map(score, options))
        row[f] = rng.choice([v for v in options if score(v) == top])
    return row


def row_id(row: dict) -> str:
    return "-".join(str(row[f]) for f in FACTORS)


def lora_config(row: dict) -> lora_jax.LoraConfig:
    targets = ("q_proj", "v_proj", "fc1") + (("embed_tokens",) if row["extra"] == "lora_embed" else ())
    saved = {"save_head": ("lm_head",), "save_embed": ("embed_tokens",)}.get(row["extra"], ())
    patterns = dict(rank_pattern={"fc1": 3, "decoder/layers/1/self_attn/q_proj": 4}, alpha_pattern={"v_proj": 6.0})
    return lora_jax.LoraConfig(rank=2, alpha=4, targets=targets, modules_to_save=saved,
                               use_rslora=row["scale"] == "rslora", init="gaussian" if row["variant"] in ("lora", "dora")
                               else row["variant"], use_dora=row["variant"] == "dora",
                               **(patterns if row["scale"] == "patterns" else {}))


def base_params(row: dict, params: dict) -> dict:
    """The fixture base as the row wants it: untied (or a tied tree plus the copy a modules_to_save entry trains, as
    PEFT makes it), cast to bfloat16, or (after a residual init, which needs plain kernels) quantised."""
    if row["head"] == "untied":
        params = lora_jax.untie_embeddings(params)
    elif row["extra"] in ("save_head", "save_embed"):
        flat = flatten_tree(params)
        for path in ([LM_HEAD] if row["extra"] == "save_head" else
                     [("model", side, "embed_tokens", "embedding") for side in ("encoder", "decoder")]):
            flat.setdefault(path, flat[SHARED].T if path == LM_HEAD else flat[SHARED])
        params = unflatten_tree(flat)
    if row["base"] == "bf16":
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    return params


def adapted_params(row: dict, params: dict, config: lora_jax.LoraConfig) -> dict:
    if row["base"] in ("int8", "nf4"):
        params = lora_jax.quantize_base(params, lora_jax.QuantSpec(row["base"], exclude=config.modules_to_save))
    return lora_jax.init_lora(params, config, jax.random.PRNGKey(0))


def _optimizer(row: dict, config):
    if row["optim"] == "loraplus":
        return lora_jax.lora_optimizer(lora_jax.adamw_factory(0.0), config, learning_rate=1e-2, loraplus_lr_ratio=4.0)
    return lora_jax.lora_optimizer(optax.adamw(1e-2), config)


def train(row: dict, model, params, config, batch, steps: int = 2):
    """`steps` jitted train steps -> (final TrainState, losses)."""
    model = model.clone(scan_layers=row["layers"] != "unrolled", remat=row["remat"])
    state = lora_jax.create_train_state(params, config, _optimizer(row, config), stack_layers=row["layers"] == "prestacked")
    kwargs, put = {}, lambda b: b
    if row["mesh"] > 1:
        mesh = sharding.make_mesh(sharding.MeshConfig(data=row["mesh"]))
        state, shardings = sharding.shard_state(state, mesh, min_size=0)
        kwargs["shardings"] = (shardings, sharding.batch_sharding(mesh))
        put = lambda b: sharding.shard_batch(b, mesh)
    step = lora_jax.make_train_step(model, config, grad_accum_steps=row["accum"], **kwargs)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, put(batch), jax.random.PRNGKey(1))
        losses.append(float(metrics["loss"]))
    return state, losses, step.num_compilations()


def main(argv) -> None:
    """Runs the rows named by index (into covering_rows()) and prints one JSON line of results."""
    from tests import test_combinations

    model, params = lora_jax.load_pretrained("tests/fixtures/tiny-bart/model")
    ref = dict(np.load("tests/fixtures/tiny-bart/reference.npz"))
    rows = covering_rows()
    results = {}
    for index in map(int, argv):
        results[row_id(rows[index])] = test_combinations.run_row(rows[index], (model, params), ref, "/tmp")
    print(json.dumps({"devices": jax.device_count(), "results": results}))


if __name__ == "__main__":
    main(sys.argv[1:])
