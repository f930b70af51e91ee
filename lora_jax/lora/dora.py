"""DoRA (Liu et al. 2024, weight-decomposed low-rank adaptation), computed as PEFT's `use_dora=True` computes it.

For an adapted kernel W (in, out) with adapter A (in, r), B (r, out), scale s and magnitude m (out,):

    V = W + s·A·B,  n = ||V||  per output column (norm over `in`),  W' = (m / n) · V

The forward pass never forms V: with x_d the adapter's (dropped-out) input,

    y = x·W + b + (m/n - 1)·(x_d·W) + (m/n)·s·(x_d·A)·B

and n is a constant for differentiation (`stop_gradient`), as in the DoRA paper (Section 4.3) and PEFT. n itself
comes from r x out and r x r products: ||V_c||² = ||W_c||² + 2s·(AᵀW ∘ B)_c summed over r + s²·(B ∘ (AᵀA)B)_c.
The magnitude starts at n, so an adapted model starts at its base.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lora_jax.quantization import dequantize


def column_norms(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """||W + s·A·B|| per output column (out,), in float32, without forming W + s·A·B."""
    w, a, b = dequantize(kernel, jnp.float32), jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    squared = (w * w).sum(0) + 2.0 * scale * ((a.T @ w) * b).sum(0) + scale * scale * (b * ((a.T @ a) @ b)).sum(0)
    return jnp.sqrt(jnp.maximum(squared, 0.0))


def dora_output(y: jax.Array, x_d: jax.Array, base_d: jax.Array, kernel: jax.Array, a: jax.Array, b: jax.Array,
                magnitude: jax.Array, scale: float) -> jax.Array:
    """The adapted layer's output from the frozen output y = x·W + b (…, out), the adapter input x_d (…, in) and
    x_d·W (`base_d`, …, out: equal to y - b when there is no dropout)."""
    norm = jax.lax.stop_gradient(column_norms(kernel, a, b, scale))
    ratio = magnitude.astype(jnp.float32) / norm
    f32 = jnp.float32
    lora = (x_d.astype(f32) @ a.astype(f32)) @ b.astype(f32)
    return y + ((ratio - 1.0) * base_d.astype(jnp.float32) + ratio * scale * lora).astype(y.dtype)


def merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, magnitude: jax.Array, scale: float) -> jax.Array:
    """W' = (m / ||W + s·A·B||) · (W + s·A·B), computed in float32, returned in the kernel's dtype (a quantised
    kernel is dequantised: the result is a plain array)."""
    v = dequantize(kernel, jnp.float32) + scale * (jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32))
    return (v * (jnp.asarray(magnitude, jnp.float32) / column_norms(kernel, a, b, scale))).astype(kernel.dtype)
