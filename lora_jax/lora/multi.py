"""Many adapters in one batch: `MultiLoraModel(module, info).apply(variables, ..., adapter_ids=ids)`.

`variables["params"]` is the base tree combined with a stacked tree (`stack.stack_adapters`). Every adapted
`nn.Dense` call adds, row by row, its own adapter's branch

    y[n] = x[n] @ W + b + scale[ids[n]] * (x[n] @ A[ids[n]]) @ B[ids[n]]

with no Python loop over adapters: either as a gathered batched matmul (each row's A and B gathered, then two
batched einsums: the BGMV form) or grouped (rows sorted by adapter and two `jax.lax.ragged_dot`s over contiguous
groups: the SGMV form). Both are one program whatever the mix of ids.

Rows: a Dense input with N = B * G leading rows for B ids (beam search's decoder: the G beams of each input are
consecutive) uses each id G times, so the encoder (B rows) and the decoder (B * beams rows) both get the right ids.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.lora.stack import LORA_SCALE, StackInfo
from lora_jax.lora.transform import LORA_A, LORA_B

METHODS = ("gather", "grouped")


def ids_for_rows(ids: jax.Array, rows: int) -> jax.Array:
    """The (rows,) adapter ids of a Dense input with `rows` leading rows: ids (B,) repeated rows / B times each."""
    batch = ids.shape[0]
    if rows == batch:
        return ids
    if rows % batch:
        raise ValueError(f"a layer input has {rows} rows, not a multiple of the {batch} adapter_ids; pass one id per "
                         "input row (generate repeats them per beam itself)")
    return jnp.repeat(ids, rows // batch, total_repeat_length=rows)


def gathered_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array, ids: jax.Array) -> jax.Array:
    """x (N, ..., in), a (K, in, r), b (K, r, out), scale (K,), ids (N,) -> (N, ..., out): row n gets
    scale[ids[n]] * (x[n] @ a[ids[n]]) @ b[ids[n]] (gathered adapters, two batched matmuls)."""
    hidden = jnp.einsum("n...i,nir->n...r", x, a[ids])
    hidden = hidden * scale[ids].reshape((-1,) + (1,) * (hidden.ndim - 1)).astype(hidden.dtype)
    return jnp.einsum("n...r,nro->n...o", hidden, b[ids])


def grouped_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array, ids: jax.Array) -> jax.Array:
    """Same result as `gathered_delta`: rows sorted by adapter, each adapter's rows multiplied by its own A and B with
    `jax.lax.ragged_dot` (no per-row copy of A and B), then put back in order."""
    rows, inner = x.shape[0], x.shape[1:-1]
    tokens = int(np.prod(inner, dtype=np.int64))
    order = jnp.argsort(ids, stable=True)
    flat = x[order].reshape(rows * tokens, x.shape[-1])
    sizes = (jnp.bincount(ids, length=a.shape[0]) * tokens).astype(jnp.int32)
    hidden = jax.lax.ragged_dot(flat, a, sizes)
    hidden = hidden * jnp.repeat(scale[ids[order]], tokens, total_repeat_length=rows * tokens)[:, None].astype(
        hidden.dtype)
    delta = jax.lax.ragged_dot(hidden, b, sizes).reshape((rows,) + inner + (b.shape[-1],))
    return delta[jnp.argsort(order)]


def multi_lora_interceptor(adapter_ids: jax.Array, method: str = "gather"):
    """A `nn.intercept_methods` interceptor adding each row's own adapter branch to stacked `nn.Dense` calls."""
    delta_fn = {"gather": gathered_delta, "grouped": grouped_delta}[method]

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense):
            return next_fun(*args, **kwargs)
        if not module.has_variable("params", LORA_SCALE):
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        a = module.get_variable("params", LORA_A)
        b = module.get_variable("params", LORA_B)
        scale = module.get_variable("params", LORA_SCALE)
        x = args[0] if args else kwargs["inputs"]
        ids = ids_for_rows(adapter_ids, x.shape[0])
        return y + delta_fn(x.astype(a.dtype), a, b.astype(a.dtype), scale, ids).astype(y.dtype)

    return intercept


def check_ids(ids: Any, info: StackInfo) -> None:
    """Raises a ValueError when concrete `ids` are not a (B,) integer vector of slots of `info` (traced ids pass)."""
    if isinstance(ids, jax.core.Tracer):
        return
    arr = np.asarray(ids)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"adapter_ids must be a (batch,) integer vector of slot ids, got {arr.dtype} {arr.shape}")
    bad = arr[(arr < 0) | (arr >= info.num_slots)]
    if bad.size:
        raise ValueError(f"adapter_ids {sorted(set(bad.tolist()))} are not slots of this stack "
                         f"(0..{info.num_slots - 1}: {list(info.names)}); use info.ids(names)")


@dataclasses.dataclass(frozen=True)
class MultiLoraModel:
    """A linen module run with a stack of adapters, each example choosing its own (by `adapter_ids` (B,)).

    Duck-types the module like `LoraModel`: `apply(variables, *args, adapter_ids=ids, **kwargs)` takes the module's
    arguments; other attributes are the module's. Hashable (a static jit argument). method: "gather" or "grouped"
    (see the module docstring). Inference only: adapter dropout does not apply."""

    module: nn.Module
    info: StackInfo
    method: str = "gather"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"MultiLoraModel.method must be one of {METHODS}, got {self.method!r}")

    def apply(self, variables, *args, adapter_ids=None, **kwargs):
        if adapter_ids is None:
            raise ValueError("MultiLoraModel.apply needs adapter_ids=(batch,) slot ids (0 = the base); "
                             "info.ids(names) maps adapter names to ids")
        check_ids(adapter_ids, self.info)
        ids = jnp.asarray(adapter_ids, jnp.int32)
        with nn.intercept_methods(multi_lora_interceptor(ids, self.method)):
            return self.module.apply(variables, *args, **kwargs)

    def init(self, *args, **kwargs):
        return self.module.init(*args, **kwargs)

    def check_adapter_ids(self, adapter_ids) -> None:
        """Raises a ValueError naming the ids that are not slots of this model's stack."""
        check_ids(adapter_ids, self.info)

    def with_adapter_ids(self, adapter_ids) -> "BoundAdapterIds":
        """This model with `adapter_ids` fixed for every `apply` (what `generate(..., adapter_ids=)` uses)."""
        return BoundAdapterIds(self, adapter_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)


class BoundAdapterIds:
    """A MultiLoraModel with its adapter ids given; made inside a traced function, so it is deliberately not hashable
    (it must never become a static jit argument: the ids are data)."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, model: MultiLoraModel, adapter_ids):
        self.model, self.adapter_ids = model, adapter_ids

    def apply(self, variables, *args, **kwargs):
        return self.model.apply(variables, *args, adapter_ids=self.adapter_ids, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)
