"""Running a linen model with LoRA adapters: `LoraModel(module, config).apply(...)`.

The adapters are not a new layer type. `LoraModel.apply` runs the wrapped module's `apply` under
`flax.linen.intercept_methods`, and the interceptor adds the side branch

    y = x @ W + b + scale * (dropout(x) @ A) @ B

to every `nn.Dense.__call__` whose params hold `lora_a`/`lora_b` (with `lora_magnitude` beside them, the DoRA
output of lora_jax.lora.dora instead). So any linen model built from `nn.Dense` gets LoRA
with no change to its code, W + AB is never materialised, and (because the train step differentiates only the
adapter leaves) no gradient is ever computed for a frozen kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.lora import dora
from lora_jax.lora.config import LoraConfig
from lora_jax.lora.leaves import LORA_A, LORA_B, LORA_MAGNITUDE


def _adapter_dropout(module: nn.Module, x: jax.Array, rate: float) -> jax.Array:
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def lora_interceptor(config: LoraConfig):
    """A `nn.intercept_methods` interceptor adding the LoRA branch to adapted `nn.Dense` calls.

    Adapter dropout (config.dropout) is applied only when the `apply` call was given a 'dropout' rng, i.e. in
    training; evaluation and generation, which pass no rngs, are deterministic."""

    def intercept(next_fun, args, kwargs, context):
        module = context.module
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
        scale = config.scale_for("/".join(module.path))
        if module.has_variable("params", LORA_MAGNITUDE):
            return _dora(module, y, x, x_d, a, b, scale)
        delta = (x_d.astype(a.dtype) @ a) @ b.astype(a.dtype)
        return y + (scale * delta).astype(y.dtype)

    return intercept


def _dora(module: nn.Dense, y: jax.Array, x: jax.Array, x_d: jax.Array, a, b, scale: float) -> jax.Array:
    """DoRA's output for the Dense `module` whose frozen output is y (see lora_jax.lora.dora). x·W is y minus the
    bias unless dropout changed the adapter's input, in which case x_d·W is computed (as PEFT does)."""
    kernel = module.get_variable("params", "kernel")
    if x_d is x:
        base_d = y - module.get_variable("params", "bias") if module.use_bias else y
    else:
        base_d = x_d.astype(module.dtype or x_d.dtype) @ kernel.astype(module.dtype or kernel.dtype)
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
        with nn.intercept_methods(lora_interceptor(self.lora_config)):
            return self.module.apply(variables, *args, **kwargs)

    def init(self, *args, **kwargs):
        return self.module.init(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes the dataclass lacks; `module` itself is a field, so no recursion.
        return getattr(self.module, name)


def with_lora(module: nn.Module, config: LoraConfig | None):
    """`LoraModel(module, config)`, or `module` itself when config is None (full fine-tuning / plain inference)."""
    return module if config is None else LoraModel(module, config)
