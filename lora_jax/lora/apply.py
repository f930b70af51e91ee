"""Running a linen model with LoRA adapters: `LoraModel(module, config).apply(...)`.

The adapters are not a new layer type. `LoraModel.apply` runs the wrapped module's `apply` under
`flax.linen.intercept_methods`, and the interceptor adds the side branch

    y = x @ W + b + scale * (dropout(x) @ A) @ B     (the branch in float32, added in the compute dtype)

to every `nn.Dense.__call__` whose params hold `lora_a`/`lora_b` (with `lora_magnitude` beside them, the DoRA
output of lora_jax.lora.dora instead; and `embed(ids) + scale * A[ids] @ B` to an adapted `nn.Embed`). So any linen
model built from `nn.Dense` gets LoRA
with no change to its code, W + AB is never materialised, and (because the train step differentiates only the
adapter leaves) no gradient is ever computed for a frozen kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.dropout import apply_dropout
from lora_jax.lora import dora
from lora_jax.lora.config import LoraConfig
from lora_jax.quantization import dequantize
from lora_jax.lora.leaves import LORA_A, LORA_B, LORA_MAGNITUDE, SCALE_LEAF, SCALES_COLLECTION
from lora_jax.tree import flatten_tree, unflatten_tree

STACKED = "stacked"  # lora_jax.models.layer_stack.STACKED (not imported: models import this package)


def _module_scale(module: nn.Module, config: LoraConfig) -> Any:
    """The adapter scale of `module`: from LoraModel's `lora_scales` collection when it has one (per-path scales,
    carried through scanned layers as data), else from the config by the module's path."""
    if module.has_variable(SCALES_COLLECTION, SCALE_LEAF):
        return module.get_variable(SCALES_COLLECTION, SCALE_LEAF)
    return config.scale_for("/".join(module.path))


def _stacked_scale(path: tuple, config: LoraConfig, num_layers: int) -> jax.Array:
    # A module inside pre-stacked layers: one scale per layer, (num_layers,).
    at = path.index(STACKED)
    return jnp.asarray([config.scale_for("/".join(path[:at] + (str(i),) + path[at + 1:])) for i in range(num_layers)],
                       jnp.float32)


def scale_tree(params, config: LoraConfig) -> dict:
    """{module path: {"scale": float32 ()}} for every module of `params` holding `lora_a` (a module inside pre-stacked
    layers: (num_layers,)), nested like `params`: LoraModel's `lora_scales` collection."""
    out = {}
    for path, a in flatten_tree(params).items():
        if path[-1] != LORA_A:
            continue
        module = path[:-1]
        if STACKED in module:
            out[module + (SCALE_LEAF,)] = _stacked_scale(module, config, a.shape[0])
        else:
            out[module + (SCALE_LEAF,)] = jnp.float32(config.scale_for("/".join(module)))
    return unflatten_tree(out)


def _adapter_dropout(module: nn.Module, x: jax.Array, rate: float) -> jax.Array:
    return apply_dropout(module.make_rng("dropout"), x, rate)


def _embed_with_lora(next_fun, args, kwargs, context, config: LoraConfig):
    """An adapted `nn.Embed`, table E (V, D), A (V, r), B (r, D): `__call__(ids)` adds scale·A[ids]@B (PEFT's
    lora_embedding branch); `attend(h)` (a tied output head) adds scale·(h@Bᵀ)@Aᵀ, so both use E + scale·A@B, as the
    merged table does. No adapter dropout: the input is token ids (PEFT applies none to embeddings either)."""
    module = context.module
    y = next_fun(*args, **kwargs)
    if context.method_name not in ("__call__", "attend"):
        return y
    a = module.get_variable("params", LORA_A)
    b = module.get_variable("params", LORA_B).astype(a.dtype)
    x = args[0] if args else kwargs[next(iter(kwargs))]
    if context.method_name == "__call__":
        delta = jnp.take(a, x, axis=0) @ b
    else:
        delta = (x.astype(a.dtype) @ b.T) @ a.T
    return y + (_module_scale(module, config) * delta).astype(y.dtype)


def lora_interceptor(config: LoraConfig):
    """A `nn.intercept_methods` interceptor adding the LoRA branch to adapted `nn.Dense` calls.

    Adapter dropout (config.dropout) is applied only when the `apply` call was given a 'dropout' rng, i.e. in
    training; evaluation and generation, which pass no rngs, are deterministic."""

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, nn.Embed) and module.has_variable("params", LORA_A):
            return _embed_with_lora(next_fun, args, kwargs, context, config)
        if context.method_name != "__call__" or not isinstance(module, nn.Dense):
            return next_fun(*args, **kwargs)
        if not module.has_variable("params", LORA_A):
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        a = module.get_variable("params", LORA_A)
        b = module.get_variable("params", LORA_B)
        x = args[0] if args else kwargs["inputs"]
        x_d = x
        if config.dropout > 0.0 and module.has_rng("dropout"):
            x_d = _adapter_dropout(module, x, config.dropout)
        scale = _module_scale(module, config)
        if module.has_variable("params", LORA_MAGNITUDE):
            return _dora(module, y, x, x_d, a, b, scale)
        # Mixed precision by trainability: the side branch runs in float32 whatever the base's storage or compute
        # dtype (and the adapters' own), and is added to the base output once, in the compute dtype.
        f32 = jnp.float32
        delta = (x_d.astype(f32) @ a.astype(f32)) @ b.astype(f32)
        return y + (scale * delta).astype(y.dtype)

    return intercept


def _dora(module: nn.Dense, y: jax.Array, x: jax.Array, x_d: jax.Array, a, b, scale: float) -> jax.Array:
    """DoRA's output for the Dense `module` whose frozen output is y (see lora_jax.lora.dora). x·W is y minus the
    bias unless dropout changed the adapter's input, in which case x_d·W is computed (as PEFT does)."""
    kernel = module.get_variable("params", "kernel")
    if x_d is x:
        base_d = y - module.get_variable("params", "bias") if module.use_bias else y
    else:
        compute = module.dtype or x_d.dtype
        base_d = x_d.astype(compute) @ dequantize(kernel, compute)
    return dora.dora_output(y, x_d, base_d, kernel, a, b, module.get_variable("params", LORA_MAGNITUDE), scale)


@dataclasses.dataclass(frozen=True)
class LoraModel:
    """A linen module together with the LoraConfig its adapters were made with.

    Duck-types the module: `apply` and `init` take the same arguments (method names as strings or unbound methods),
    and other attributes (`config`, `dtype`, ...) are the module's. Hashable, so it can be a static jit argument.
    With params that hold no adapters (e.g. merged ones) it computes exactly what the plain module computes."""

    module: nn.Module
    lora_config: LoraConfig

    def apply(self, variables, *args, **kwargs):
        config = self.lora_config
        if (config.rank_pattern or config.alpha_pattern) and SCALES_COLLECTION not in variables:
            # A scanned layer body has one module path for every layer, so a per-path scale cannot be read from the
            # path there: the scales travel as data (a collection the layer stack stacks and scans with the params).
            variables = {**variables, SCALES_COLLECTION: scale_tree(variables["params"], config)}
        with nn.intercept_methods(lora_interceptor(config)):
            return self.module.apply(variables, *args, **kwargs)

    def init(self, *args, **kwargs):
        return self.module.init(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes the dataclass lacks; `module` itself is a field, so no recursion.
        return getattr(self.module, name)


def with_lora(module: nn.Module, config: LoraConfig | None):
    """`LoraModel(module, config)`, or `module` itself when config is None (full fine-tuning / plain inference)."""
    return module if config is None else LoraModel(module, config)
