"""LoRA on a lighter frozen base: the bench's LoRA train step (and beam search) with the base stored in bfloat16
(computing in float32), as int8 or as NF4 kernels (`lora_jax.quantization`). Same model, seeded weights, batch,
adapters and timing protocol as `jax_lora` in jax_bench.py; only the base's storage differs. Weights are converted
one at a time as they are drawn, so no float32 copy of the model ever exists in these processes."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import traverse_util

import lora_jax
from bench.common import BenchSpec, random_leaves
from bench.jax_bench import bench_generate, bench_train, model_config
from lora_jax.checkpoints.hf import expected_shapes
from lora_jax.quantization import QuantSpec, quantize_leaf, storage_bytes

# base name -> (storage dtype of unquantised leaves, quantisation of the Dense kernels). The int8 base also stores
# the tied token embedding / LM head as int8 rows (issue 25), the NF4 base keeps it in float32 as QLoRA does.
BASES = {"bf16": (jnp.bfloat16, None), "int8": (jnp.float32, QuantSpec("int8", embeddings=True)),
         "nf4": (jnp.float32, QuantSpec("nf4"))}


def build_stored_model(spec: BenchSpec, base: str):
    """(model, params) of the bench's seeded weights with the base stored as `base` says, converted leaf by leaf.
    The model computes in float32 whatever the storage."""
    param_dtype, quant = BASES[base]
    config = model_config(spec)
    flat = {}
    for path, values in random_leaves(expected_shapes(config), spec.seed, config.init_std):
        stored = quantize_leaf(path, values, quant)
        flat[path] = jnp.asarray(values, param_dtype) if stored is values else stored
    model = lora_jax.BartForConditionalGeneration(config, dtype=jnp.float32, param_dtype=param_dtype)
    return model, traverse_util.unflatten_dict(flat)


def _lora_on(base: str, spec: BenchSpec) -> dict[str, Any]:
    stored = {}

    def build(spec):
        model, params = build_stored_model(spec, base)
        stored["bytes"] = storage_bytes(params)
        return model, params

    return {"base": base, **bench_train(spec, full_finetune=False, build=build), "base_bytes": stored["bytes"]}


def bench_lora_bf16(spec: BenchSpec) -> dict[str, Any]:
    return _lora_on("bf16", spec)


def bench_lora_int8(spec: BenchSpec) -> dict[str, Any]:
    return _lora_on("int8", spec)


def bench_lora_nf4(spec: BenchSpec) -> dict[str, Any]:
    return _lora_on("nf4", spec)


def bench_generate_int8(spec: BenchSpec) -> dict[str, Any]:
    """4-beam search throughput on the int8 base (kernels dequantised inside each decoding step's layers, the tied
    head block by block). The bytes a step must read count one byte per kernel / head weight (scales not counted)."""
    return {"base": "int8", **bench_generate(spec, build=lambda s: build_stored_model(s, "int8"), weight_bytes=1.0)}
