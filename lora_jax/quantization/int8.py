"""int8 storage of a frozen kernel: per-output-channel absmax ("LLM.int8()"'s vector-wise weight quantisation).

A kernel W (in, out) is stored as int8 codes q (in, out) and one float32 scale per output channel s (out,) =
max_i |W[i, o]| / 127, with q = round(W / s) in [-127, 127]. Dequantised, W ≈ q * s; each value is off by at most
s / 2 = absmax / 254 of its column.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

INT8_MAX = 127


class _Int8Codes:
    """What Int8Kernel and Int8Embedding share: int8 `codes` beside float32 `scale`s."""

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.scale.nbytes)


@flax.struct.dataclass
class Int8Kernel(_Int8Codes):
    """A kernel (in, out) as int8 `codes` (in, out) and float32 `scale` (out,); `dtype` is the dtype it was stored in
    before quantisation (what `merge_lora` and `dequantize` give back). Both arrays are pytree leaves, so jit,
    donation, sharding and checkpointing treat them as data."""

    codes: jax.Array
    scale: jax.Array
    dtype: str = flax.struct.field(pytree_node=False, default="float32")

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """The kernel (in, out) in `dtype`: codes * scale, computed in float32."""
        return (self.codes.astype(jnp.float32) * self.scale.astype(jnp.float32)).astype(dtype)


def quantize_int8(kernel: Any) -> Int8Kernel:
    """kernel (in, out), numpy or jax, float -> Int8Kernel (quantised on the host in float32)."""
    w = np.asarray(jax.device_get(kernel))
    dtype = str(w.dtype)
    w = w.astype(np.float32)
    if w.ndim != 2:
        raise ValueError(f"int8 quantisation takes a 2-D kernel (in, out), got shape {w.shape}")
    absmax = np.abs(w).max(axis=0)
    scale = np.where(absmax > 0, absmax / INT8_MAX, 1.0).astype(np.float32)
    codes = np.clip(np.round(w / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
    return Int8Kernel(jnp.asarray(codes), jnp.asarray(scale), dtype)


@flax.struct.dataclass
class Int8Embedding(_Int8Codes):
    """A token embedding (vocab, features) as int8 `codes` (vocab, features) and one float32 `scale` per row
    (vocab,) = max_j |E[v, j]| / 127. Per row, because a tied LM head uses the table transposed as its kernel
    (features, vocab): the rows are the head's output channels, so this is `Int8Kernel`'s per-output-channel absmax
    for the head, and a lookup dequantises only the rows it reads."""

    codes: jax.Array
    scale: jax.Array
    dtype: str = flax.struct.field(pytree_node=False, default="float32")

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """The table (vocab, features) in `dtype`: codes * scale, computed in float32."""
        return (self.codes.astype(jnp.float32) * self.scale.astype(jnp.float32)[:, None]).astype(dtype)

    def lookup(self, ids: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
        """ids (...) -> rows (..., features) in `dtype`, dequantising only the rows read."""
        rows = jnp.take(self.codes, ids, axis=0).astype(jnp.float32)
        return (rows * jnp.take(self.scale, ids, axis=0).astype(jnp.float32)[..., None]).astype(dtype)


def quantize_int8_rows(table: Any) -> Int8Embedding:
    """table (vocab, features), numpy or jax, float -> Int8Embedding (quantised on the host in float32)."""
    w = np.asarray(jax.device_get(table))
    if w.ndim != 2:
        raise ValueError(f"int8 embedding quantisation takes a 2-D table (vocab, features), got shape {w.shape}")
    kernel = quantize_int8(w.T)  # the head's kernel (features, vocab): per-column absmax = per-row of the table
    return Int8Embedding(jnp.asarray(np.ascontiguousarray(np.asarray(kernel.codes).T)), kernel.scale, str(w.dtype))
