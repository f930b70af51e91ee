"""BART's multi-head attention and its masks.

Two ways to compute softmax(q k^T / sqrt(Dh) + bias) v, chosen per call:

* `jax.nn.dot_product_attention` (the default): XLA's fused attention on CPU/TPU, and cuDNN flash attention on
  NVIDIA GPUs when the model is built with `attention="cudnn"` (bf16/fp16 only; jax raises for shapes it lacks).
* the explicit einsum-softmax-einsum path, kept where the fused call does not apply: attention dropout during
  training (dot_product_attention has no dropout), and incremental decoding, whose key/value cache is laid out
  head-major (B, H, L, Dh) and whose beams may share one row of cross-attention keys/values.
  `attention="explicit"` forces it everywhere (the reference the tests compare against).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from lora_jax.models.config import BartConfig
from lora_jax.dropout import Dropout
from lora_jax.quantization import Dense

Array = jax.Array
_NEG_INF = -1e9
# attention= values: None lets jax choose (XLA today), the rest are jax's implementation names or our explicit path.
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn", "explicit")


def check_attention(name: str | None) -> str | None:
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention={name!r} is not supported; use one of {list(ATTENTION_IMPLEMENTATIONS)}")
    return name


def check_attention_backend(name: str | None, key: str = "attention") -> None:
    """ValueError naming `key` when `name` is "cudnn" and no GPU is attached (jax's cuDNN attention is GPU-only)."""
    if name == "cudnn" and not any(d.platform == "gpu" for d in jax.devices()):
        raise ValueError(f"{key}='cudnn' needs an NVIDIA GPU, and this machine's jax backend is "
                         f"{jax.default_backend()}: set {key}=null (jax chooses) or 'explicit'")


def padding_bias(mask: Array, dtype=jnp.float32) -> Array:
    """(B, Tk) 1/0 mask -> (B, 1, 1, Tk) additive attention bias."""
    return jnp.where(mask[:, None, None, :] > 0, 0.0, _NEG_INF).astype(dtype)


def causal_bias(q_len: int, k_len: int, q_offset: Array | int = 0, dtype=jnp.float32) -> Array:
    """(1, 1, Tq, Tk) additive bias letting query i (at absolute position q_offset + i) see keys <= it."""
    q_pos = jnp.arange(q_len)[:, None] + q_offset
    k_pos = jnp.arange(k_len)[None, :]
    return jnp.where(k_pos <= q_pos, 0.0, _NEG_INF).astype(dtype)[None, None]


class BartAttention(nn.Module):
    """Multi-head attention; `kv` given in `cached_kv` skips the key/value projections (cross-attention cache).

    attention: None / "xla" / "cudnn" route cache-free calls without attention dropout through
    `jax.nn.dot_product_attention(implementation=attention)`; "explicit" always uses the einsum path."""

    config: BartConfig
    num_heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str | None = None

    def setup(self):
        dense = lambda name: Dense(
            self.config.d_model,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.initializers.normal(self.config.init_std),
            name=name,
        )
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (dense(n) for n in ("q_proj", "k_proj", "v_proj", "out_proj"))
        self.attn_dropout = Dropout(rate=self.config.attention_dropout)

    def _split(self, x: Array) -> Array:  # (B, T, D) -> (B, T, H, Dh)
        return x.reshape(x.shape[:2] + (self.num_heads, -1))

    def project_kv(self, states: Array) -> tuple[Array, Array]:
        """(B, T, D) -> keys, values, each head-major (B, H, T, Dh): the layout the attention matmuls read, so a
        cached key/value is laid out once, not transposed again at every decoding step."""
        heads_first = lambda x: self._split(x).transpose(0, 2, 1, 3)
        return heads_first(self.k_proj(states)), heads_first(self.v_proj(states))

    def uses_fused(self, cached: bool, deterministic: bool) -> bool:
        """Whether a call goes through `jax.nn.dot_product_attention` (see the module docstring for when not)."""
        dropout_active = not deterministic and self.config.attention_dropout > 0.0
        return self.attention != "explicit" and not cached and not dropout_active

    def __call__(
        self,
        hidden: Array,
        bias: Array,
        kv_states: Array | None = None,
        cached_kv: tuple[Array, Array] | None = None,
        self_cache: dict | None = None,
        deterministic: bool = True,
    ) -> tuple[Array, dict | None]:
        """hidden (B, Tq, D); bias broadcastable to (B, H, Tq, Tk) -> ((B, Tq, D), updated self_cache).

        `self_cache` = {'k', 'v': (B, H, L, Dh), 'index': ()} holds past self-attention keys/values; the new ones
        are written at `index` and attention runs over all L slots (the bias masks the unwritten ones).
        `cached_kv` may hold fewer rows than `hidden`, (B / G, H, Tk, Dh): then each group of G consecutive rows of
        `hidden` (the beams of one input) attends to one row of keys/values, and `bias` is (B / G, 1, 1, Tk).
        """
        head_dim = self.config.d_model // self.num_heads
        q = self._split(self.q_proj(hidden)) * (head_dim**-0.5)  # (B, Tq, H, Dh)
        if self.uses_fused(cached_kv is not None or self_cache is not None, deterministic):
            states = hidden if kv_states is None else kv_states
            k, v = self._split(self.k_proj(states)), self._split(self.v_proj(states))  # (B, Tk, H, Dh)
            # q is already scaled (as on the explicit path), so both paths round alike.
            bias_dtype = q.dtype if self.attention == "cudnn" else jnp.float32  # cuDNN wants q's dtype
            out = jax.nn.dot_product_attention(q, k, v, bias=bias.astype(bias_dtype), scale=1.0,
                                               implementation=self.attention)
            return self.out_proj(out.reshape(hidden.shape[:2] + (-1,))), None
        if cached_kv is not None:
            k, v = cached_kv
        else:
            k, v = self.project_kv(hidden if kv_states is None else kv_states)
        if k.shape[0] != q.shape[0]:
            # Beams share their input's keys/values: fold the G beams into the query axis, so one (G*Tq, Tk)
            # attention per input reads the keys/values once instead of G times.
            q = q.reshape((k.shape[0], -1) + q.shape[2:])
        if self_cache is not None:
            idx = self_cache["index"]
            zero = jnp.zeros((), idx.dtype)  # all indices of one integer type (int64 Python zeros under jax_enable_x64)
            at = (zero, zero, idx, zero)
            k = jax.lax.dynamic_update_slice(self_cache["k"], k.astype(self_cache["k"].dtype), at)
            v = jax.lax.dynamic_update_slice(self_cache["v"], v.astype(self_cache["v"].dtype), at)
            self_cache = {"k": k, "v": v, "index": idx + hidden.shape[1]}
        # Head-major q, so both matmuls are plain batched matmuls over (b, h): XLA's CPU backend hands those to its
        # fast matmul library, while the (b, q, h, d) form went to its generic dot loop (3.6x slower per decoding
        # step at bart-base, beams folded in).
        q = q.transpose(0, 2, 1, 3)  # (B, H, Tq, Dh)
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
        weights = jax.nn.softmax(logits, axis=-1)
        weights = self.attn_dropout(weights, deterministic=deterministic).astype(v.dtype)
        out = jnp.einsum("bhqk,bhkd->bhqd", weights, v).transpose(0, 2, 1, 3).reshape(hidden.shape[:2] + (-1,))
        return self.out_proj(out), self_cache
