"""`Dense`: `flax.linen.Dense` that also runs with a kernel stored quantised or in another dtype than it computes in.

A quantised kernel (or a bfloat16 one in a float32 computation) is converted inside the layer's call, by a matmul
with its own VJP whose backward pass converts the stored kernel again instead of keeping the converted kernel alive
from forward to backward. So no float32 copy of the whole frozen tree ever exists: only the converted kernels of the
layers being computed (XLA's buffer plan of a train step at bart-base width has one to two layers' worth extra).
With a plain kernel in the compute dtype the layer is exactly `nn.Dense` (same parameters, same numerics), and
`nn.intercept_methods` interceptors (LoRA's) see it as one.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.quantization.spec import is_quantized


def _convert(kernel: Any, dtype: Any) -> jax.Array:
    return kernel.dequantize(dtype) if is_quantized(kernel) else kernel.astype(dtype)


def _project(inputs: jax.Array, kernel: jax.Array, precision) -> jax.Array:
    """inputs (..., in) @ kernel (in, out) -> (..., out)."""
    return jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def converted_matmul(inputs: jax.Array, kernel: Any, dtype: Any, precision=None) -> jax.Array:
    """inputs (..., in) @ kernel (in, out), with `kernel` (quantised, or stored in another dtype) converted to `dtype`
    inside the call. The backward pass converts the stored kernel again rather than keep the converted one alive
    from forward to backward."""
    return _project(inputs, _convert_when_ready(kernel, inputs, dtype), precision)


def _forward(inputs, kernel, dtype, precision):
    # Residuals: the inputs (used only for a trainable kernel's gradient; XLA drops them otherwise) and the kernel
    # as stored, which is alive anyway.
    return converted_matmul(inputs, kernel, dtype, precision), (inputs, kernel)


def _convert_when_ready(kernel: Any, ready: jax.Array, dtype: Any) -> jax.Array:
    """`_convert(kernel, dtype)`, tied to the array `ready` (the layer's input, or in the backward pass its output
    gradient). Both branches of the `cond` are the conversion; its predicate reads `ready`, so XLA cannot start the
    conversion before `ready` exists (its CPU scheduler would otherwise convert every layer's kernel at the start of
    the program), nor merge the backward's conversion with the forward's (which would keep every layer's converted
    kernel alive from forward to backward). An optimisation barrier would not do: XLA's CPU pipeline drops barriers
    before common-subexpression elimination."""
    first = ready.reshape(-1)[0]
    convert = lambda k: _convert(k, dtype)
    return jax.lax.cond(first == first, convert, convert, kernel)


def _backward(dtype, precision, residuals, grad):
    inputs, kernel = residuals
    weight = _convert_when_ready(kernel, grad, dtype)
    d_inputs = jax.lax.dot_general(grad, weight, (((grad.ndim - 1,), (1,)), ((), ())), precision=precision)
    if is_quantized(kernel):
        return d_inputs.astype(inputs.dtype), None  # quantised kernels are frozen: no gradient
    batch_axes = tuple(range(inputs.ndim - 1))
    d_kernel = jax.lax.dot_general(inputs, grad, ((batch_axes, batch_axes), ((), ())), precision=precision)
    return d_inputs.astype(inputs.dtype), d_kernel.astype(kernel.dtype)


converted_matmul.defvjp(_forward, _backward)


class Dense(nn.Dense):
    """nn.Dense whose `kernel` may be an Int8Kernel / NF4Kernel, or stored in another dtype than `dtype`."""

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        stored = self.get_variable("params", "kernel") if self.has_variable("params", "kernel") else None
        if stored is None or not is_quantized(stored):
            stored = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        dtype = self.dtype or jnp.result_type(inputs, jnp.dtype(stored.dtype))
        inputs = jnp.asarray(inputs, dtype)
        if is_quantized(stored) or jnp.dtype(stored.dtype) != jnp.dtype(dtype):
            y = converted_matmul(inputs, stored, dtype, self.precision)
        else:
            y = _project(inputs, stored, self.precision)
        if bias is not None:
            y = y + jnp.reshape(bias.astype(dtype), (1,) * (y.ndim - 1) + (-1,))
        return y
