"""`Embed`: `flax.linen.Embed` that also runs with its table stored as int8 (`Int8Embedding`), including as a tied
LM head.

The head's matmul, query (..., D) @ table.T (D, V), goes block by block over the vocabulary: each block of
`HEAD_BLOCK_ROWS` rows is dequantised and multiplied, and its logits are written into the output, so at most one
block exists in float at a time instead of a float32 copy of the whole table (154 MB at bart-base size, as much as
the rest of the frozen int8 base). The backward pass (the gradient reaching the decoder from a LoRA loss) walks the
same blocks again instead of keeping any converted block alive. A lookup dequantises only the rows it reads.
With a float table the layer computes exactly as `nn.Embed`, and LoRA's interceptor sees it as one.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.quantization.int8 import Int8Embedding

HEAD_BLOCK_ROWS = 4096  # vocabulary rows per block: 12 MB in float32 at d 768, large enough for full-speed matmuls


def _block(table: Int8Embedding, start, size: int, dtype: Any) -> jax.Array:
    """Rows start .. start + size of the table, dequantised to `dtype` (size, D)."""
    codes = jax.lax.dynamic_slice_in_dim(table.codes, start, size, axis=0).astype(jnp.float32)
    scale = jax.lax.dynamic_slice_in_dim(table.scale, start, size, axis=0).astype(jnp.float32)
    return (codes * scale[:, None]).astype(dtype)


def _blocks(vocab: int, block_rows: int) -> tuple[int, int]:
    """(number of full blocks, rows in the last partial block)."""
    block_rows = min(block_rows, vocab)
    return vocab // block_rows, vocab % block_rows


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def int8_attend(query: jax.Array, table: Int8Embedding, dtype: Any, block_rows: int = HEAD_BLOCK_ROWS) -> jax.Array:
    """query (..., D) @ dequantised table (V, D).T -> (..., V) in `dtype`, one block of rows at a time."""
    vocab = table.codes.shape[0]
    block_rows = min(block_rows, vocab)
    full, rest = _blocks(vocab, block_rows)
    q = query.astype(dtype)
    out = jnp.zeros(q.shape[:-1] + (vocab,), dtype)

    def body(i, out):
        logits = q @ _block(table, i * block_rows, block_rows, dtype).T
        return jax.lax.dynamic_update_slice_in_dim(out, logits, i * block_rows, axis=out.ndim - 1)

    out = jax.lax.fori_loop(0, full, body, out)
    if rest:
        out = out.at[..., full * block_rows:].set(q @ _block(table, full * block_rows, rest, dtype).T)
    return out


def _attend_forward(query, table, dtype, block_rows):
    # Residuals: the query (for its shape and dtype; small) and the table as stored, which is alive anyway.
    return int8_attend(query, table, dtype, block_rows), (query, table)


def _attend_backward(dtype, block_rows, residuals, grad):
    """d query = grad (..., V) @ dequantised table (V, D), block by block; the int8 table is frozen (no gradient)."""
    query, table = residuals
    vocab = table.codes.shape[0]
    block_rows = min(block_rows, vocab)
    full, rest = _blocks(vocab, block_rows)

    def body(i, acc):
        g = jax.lax.dynamic_slice_in_dim(grad, i * block_rows, block_rows, axis=grad.ndim - 1).astype(dtype)
        return acc + (g @ _block(table, i * block_rows, block_rows, dtype)).astype(jnp.float32)

    acc = jax.lax.fori_loop(0, full, body, jnp.zeros(query.shape, jnp.float32))
    if rest:
        g = grad[..., full * block_rows:].astype(dtype)
        acc = acc + (g @ _block(table, full * block_rows, rest, dtype)).astype(jnp.float32)
    return acc.astype(query.dtype), None


int8_attend.defvjp(_attend_forward, _attend_backward)


class Embed(nn.Embed):
    """nn.Embed whose `embedding` may be an `Int8Embedding` (lookups and the tied head computed without a float
    copy of the table); with a float table, the same computation as nn.Embed."""

    def setup(self):
        stored = self.get_variable("params", "embedding") if self.has_variable("params", "embedding") else None
        if isinstance(stored, Int8Embedding):
            self.embedding = stored
        else:
            super().setup()

    def __call__(self, inputs: jax.Array) -> jax.Array:
        # Not super().__call__: that call would pass through method interceptors (LoRA's) a second time.
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")
        if isinstance(self.embedding, Int8Embedding):
            return self.embedding.lookup(inputs, self.dtype or jnp.float32)
        (embedding,) = self.promote_dtype(self.embedding, dtype=self.dtype, inexact=False)
        return jnp.take(embedding, inputs, axis=0)

    def attend(self, query: jax.Array) -> jax.Array:
        if isinstance(self.embedding, Int8Embedding):
            return int8_attend(query, self.embedding, self.dtype or query.dtype, HEAD_BLOCK_ROWS)
        query, embedding = self.promote_dtype(query, self.embedding, dtype=self.dtype)
        return jnp.dot(query, embedding.T)
