"""PiSSA and OLoRA: adapters initialised from the frozen kernel's own decomposition, leaving a residual base.

For a kernel W (in, out), rank r and scale s (PEFT's `init_lora_weights="pissa" | "pissa_niter_K" | "olora"`, in our
(in, out) layout):
- PiSSA (Meng et al. 2024): W = U·S·Vᵀ; A = U_r·sqrt(S_r / s) (in, r), B = sqrt(S_r / s)·V_rᵀ (r, out), so that
  s·A·B is W's best rank-r approximation. "pissa_niter_K" uses a randomized SVD with K subspace iterations.
- OLoRA (Büyükakyüz 2024): Wᵀ = Q·R; A = R_rᵀ (in, r), B = Q_rᵀ (r, out).
Either way the base kernel becomes the residual W - s·A₀·B₀, so the adapted model starts exactly at the base.

Because the base changed, a trained adapter (A, B) only means something on the residual. `plain_lora_on_original`
turns it into an ordinary LoRA on the *original* base, as PEFT's `path_initial_model_for_weight_conversion` does:
s·A·B - s·A₀·B₀ = s·[A, A₀]·[B; -B₀], a rank-2r adapter with the same scale (alpha doubled; times sqrt 2 with
rsLoRA), which loads on the untouched base in lora_jax and in PEFT.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.lora.config import LoraConfig
from lora_jax.lora.leaves import LORA_A, LORA_B
from lora_jax.tree import flatten_tree, path_str, unflatten_tree


def randomized_svd(w: jax.Array, rank: int, niter: int, rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-`rank` (U (in, r), S (r,), Vt (r, out)) of w by randomized subspace iteration (Halko et al. 2011,
    as torch.svd_lowrank with q = rank)."""
    q, _ = jnp.linalg.qr(w @ jax.random.normal(rng, (w.shape[1], rank), w.dtype))
    for _ in range(niter):
        q, _ = jnp.linalg.qr(w.T @ q)
        q, _ = jnp.linalg.qr(w @ q)
    u, s, vt = jnp.linalg.svd(q.T @ w, full_matrices=False)
    return q @ u, s, vt


def principal_factors(kernel: jax.Array, rank: int, scale: float, init: str, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(A (in, r), B (r, out)) in float32 from W's decomposition (see the module docstring)."""
    w = jnp.asarray(kernel, jnp.float32)
    if init == "olora":
        q, r = jnp.linalg.qr(w.T)
        return r[:rank].T, q[:, :rank].T
    if init == "pissa":
        u, s, vt = jnp.linalg.svd(w, full_matrices=False)
    else:
        u, s, vt = randomized_svd(w, rank, int(init.removeprefix("pissa_niter_")), rng)
    root = jnp.sqrt(s[:rank] / scale)
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def residual_adapters(params: Mapping, config: LoraConfig, modules: list[str], rng: jax.Array) -> dict:
    """params with `lora_a`/`lora_b` from `config.init` beside each of `modules`' kernels, and those kernels replaced
    by their residual W - s·A·B (in the kernel's dtype)."""
    flat = flatten_tree(params)
    for key, module in zip(jax.random.split(rng, max(len(modules), 1)), modules):
        path = tuple(module.split("/"))
        kernel, scale = flat[path + ("kernel",)], config.scale_for(module)
        a, b = principal_factors(kernel, config.rank_for(module), scale, config.init, key)
        flat[path + ("kernel",)] = (jnp.asarray(kernel, jnp.float32) - scale * (a @ b)).astype(kernel.dtype)
        flat[path + (LORA_A,)], flat[path + (LORA_B,)] = a, b
    return unflatten_tree(flat)


def initial_adapter(params: Mapping) -> dict:
    """The `lora_a`/`lora_b` leaves of freshly initialised params (A₀, B₀), to keep for `plain_lora_on_original`."""
    return unflatten_tree({p: np.asarray(v) for p, v in flatten_tree(params).items() if p[-1] in (LORA_A, LORA_B)})


def plain_lora_config(config: LoraConfig) -> LoraConfig:
    """The config of the converted adapter: rank doubled, alpha doubled (sqrt 2 with rsLoRA), plain init."""
    factor = math.sqrt(2.0) if config.use_rslora else 2.0
    return dataclasses.replace(
        config, rank=2 * config.rank, alpha=factor * config.alpha, init="gaussian",
        rank_pattern=tuple((p, 2 * r) for p, r in config.rank_pattern),
        alpha_pattern=tuple((p, factor * a) for p, a in config.alpha_pattern))


def plain_lora_on_original(adapter: Mapping, initial: Mapping, config: LoraConfig) -> tuple[dict, LoraConfig]:
    """A trained residual-init adapter (and its A₀, B₀) -> (an ordinary LoRA adapter for the original base, its
    config). Other leaves (modules_to_save) are kept as they are."""
    flat, first = flatten_tree(adapter), flatten_tree(initial)
    out = dict(flat)
    for path in [p for p in flat if p[-1] == LORA_A]:
        module = path[:-1]
        a0, b0 = first[module + (LORA_A,)], first[module + (LORA_B,)]
        out[path] = np.concatenate([np.asarray(flat[path], np.float32), np.asarray(a0, np.float32)], axis=1)
        out[module + (LORA_B,)] = np.concatenate(
            [np.asarray(flat[module + (LORA_B,)], np.float32), -np.asarray(b0, np.float32)], axis=0)
    return unflatten_tree(out), plain_lora_config(config)


def original_base(params: Mapping, initial: Mapping, config: LoraConfig) -> dict:
    """The base before a residual init: W = (W - s·A₀·B₀) + s·A₀·B₀ for every adapted kernel; adapter leaves kept."""
    flat, first = flatten_tree(params), flatten_tree(initial)
    for path in [p for p in first if p[-1] == LORA_A]:
        module = path[:-1]
        kernel, scale = flat[module + ("kernel",)], config.scale_for(path_str(module))
        delta = scale * (np.asarray(first[path], np.float32) @ np.asarray(first[module + (LORA_B,)], np.float32))
        flat[module + ("kernel",)] = (jnp.asarray(kernel, jnp.float32) + delta).astype(kernel.dtype)
    return unflatten_tree(flat)
