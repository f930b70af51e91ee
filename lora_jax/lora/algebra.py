"""Adapter algebra (PEFT's `add_weighted_adapter`, and task vectors) as pure functions over adapter trees.

Every function takes adapters with their LoraConfigs and returns (adapter tree, LoraConfig) of one new adapter whose
scale is 1 on every module (alpha = rank there), so its delta is simply A @ B. With dW_i = scale_i * A_i @ B_i
(in, out) and weights w_i, per module:

- `cat`:    A = [c_1 A_1, ..., c_n A_n], B = [d_1 B_1; ...; d_n B_n], ranks add. A @ B = sum_i w_i dW_i exactly
  (c_i d_i = w_i scale_i; c_i = sign(w_i) sqrt(|w_i| scale_i), d_i = sqrt(|w_i| scale_i)).
- `svd`:    the best rank-`rank` factorisation of sum_i w_i dW_i (truncated SVD, computed from the cat factors by QR,
  so dW is never formed): exact when `rank` >= the sum's rank, else its error is the dropped singular values.
- `linear`: PEFT's "linear" for equal ranks, A = sum_i c_i A_i and B = sum_i d_i B_i: the rank stays r, but A @ B
  holds the cross terms c_i d_j A_i B_j, so it equals the weighted sum only for one adapter (or when the others'
  products vanish). Use `cat` or `svd` for the exact sum.
- `negate` (dW -> -dW) and `subtract` (dW_1 - dW_2, exact, by `cat`): task-vector arithmetic.

A module that some adapters do not adapt takes part with only those that do.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from lora_jax.lora.config import LoraConfig
from lora_jax.lora.transform import LORA_A, LORA_B
from lora_jax.tree import flatten_tree, path_str, unflatten_tree

Factors = dict[str, list[tuple[np.ndarray, np.ndarray]]]  # module -> [(c_i A_i, d_i B_i) of each adapter on it]


def _weighted_factors(adapters: Sequence[Mapping], configs: Sequence[LoraConfig], weights: Sequence[float]) -> Factors:
    """Per module, each adapter's (c_i A_i, d_i B_i) in float64 with c_i d_i = w_i * scale_i."""
    if not (len(adapters) == len(configs) == len(weights)) or not adapters:
        raise ValueError(f"need one config and one weight per adapter, got {len(adapters)} adapters, "
                         f"{len(configs)} configs, {len(weights)} weights")
    out: Factors = {}
    for adapter, config, weight in zip(adapters, configs, weights):
        flat = flatten_tree(adapter)
        for path in sorted(p for p in flat if p[-1] == LORA_A):
            module = path_str(path[:-1])
            root = math.sqrt(abs(weight) * config.scale_for(module))
            a = np.asarray(flat[path], np.float64) * math.copysign(root, weight)
            b = np.asarray(flat[path[:-1] + (LORA_B,)], np.float64) * root
            out.setdefault(module, []).append((a, b))
    return out


def delta_weights(adapter: Mapping, config: LoraConfig) -> dict[str, np.ndarray]:
    """{module path: dW = scale * A @ B (in, out), float64} of one adapter (the dense reference for the others)."""
    return {m: fs[0][0] @ fs[0][1] for m, fs in _weighted_factors([adapter], [config], [1.0]).items()}


def _result(modules: Mapping[str, tuple[np.ndarray, np.ndarray]], dtype) -> tuple[dict, LoraConfig]:
    """An adapter tree and a LoraConfig with scale 1 on every module (alpha = that module's rank)."""
    flat, ranks = {}, {}
    for module, (a, b) in modules.items():
        key = tuple(module.split("/"))
        flat[key + (LORA_A,)], flat[key + (LORA_B,)] = a.astype(dtype), b.astype(dtype)
        ranks[module] = a.shape[1]
    rank = max(ranks.values())
    odd = {m: r for m, r in ranks.items() if r != rank}  # full paths: they match only their own module
    config = LoraConfig(rank=rank, alpha=float(rank), targets=tuple(sorted(modules)), rank_pattern=odd,
                        alpha_pattern={m: float(r) for m, r in odd.items()})
    return unflatten_tree(flat), config


def cat(adapters, configs, weights, dtype=np.float32) -> tuple[dict, LoraConfig]:
    """Concatenation: ranks add and A @ B = sum_i w_i * scale_i * A_i @ B_i exactly."""
    factors = _weighted_factors(adapters, configs, weights)
    modules = {m: (np.concatenate([a for a, _ in fs], 1), np.concatenate([b for _, b in fs], 0))
               for m, fs in factors.items()}
    return _result(modules, dtype)


def linear(adapters, configs, weights, dtype=np.float32) -> tuple[dict, LoraConfig]:
    """PEFT's "linear" combination of adapters of equal rank per module: A = sum c_i A_i, B = sum d_i B_i."""
    modules = {}
    for module, fs in _weighted_factors(adapters, configs, weights).items():
        ranks = sorted({a.shape[1] for a, _ in fs})
        if len(ranks) > 1:
            raise ValueError(f"linear combination needs equal ranks, but {module} has ranks {ranks}; "
                             "use cat (ranks add) or svd (a chosen rank)")
        modules[module] = (sum(a for a, _ in fs), sum(b for _, b in fs))
    return _result(modules, dtype)


def _truncated(a: np.ndarray, b: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The best rank-`rank` (A', B') with A' B' ~ a @ b (in, R) x (R, out): QR of both factors, SVD of R x R; the
    singular values are split evenly (sqrt) between A' and B'; zero columns pad a sum of lower rank."""
    qa, ra = np.linalg.qr(a)
    qb, rb = np.linalg.qr(b.T)
    u, s, vt = np.linalg.svd(ra @ rb.T)
    keep = min(rank, len(s))
    root = np.sqrt(s[:keep])
    new_a, new_b = np.zeros((a.shape[0], rank)), np.zeros((rank, b.shape[1]))
    new_a[:, :keep] = (qa @ u[:, :keep]) * root
    new_b[:keep] = root[:, None] * (vt[:keep] @ qb.T)
    return new_a, new_b


def svd(adapters, configs, weights, rank: int, dtype=np.float32) -> tuple[dict, LoraConfig]:
    """Rank-`rank` SVD re-factorisation of sum_i w_i * scale_i * A_i @ B_i (exact when the sum has rank <= `rank`)."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"svd combination needs a rank >= 1, got {rank!r}")
    combined, _ = cat(adapters, configs, weights, dtype=np.float64)
    flat = flatten_tree(combined)
    modules = {path_str(p[:-1]): _truncated(flat[p], flat[p[:-1] + (LORA_B,)], rank) for p in flat if p[-1] == LORA_A}
    return _result(modules, dtype)


def negate(adapter, config, dtype=np.float32) -> tuple[dict, LoraConfig]:
    """The adapter with delta -dW (B negated), scale 1."""
    return cat([adapter], [config], [-1.0], dtype)


def subtract(adapter, config, other, other_config, dtype=np.float32) -> tuple[dict, LoraConfig]:
    """dW - dW_other, exactly (ranks add)."""
    return cat([adapter, other], [config, other_config], [1.0, -1.0], dtype)


COMBINATIONS = {"linear": linear, "cat": cat, "svd": svd}


def add_weighted_adapter(adapters: Sequence[Mapping], configs: Sequence[LoraConfig], weights: Sequence[float],
                         combination_type: str = "svd", rank: int | None = None) -> tuple[dict, LoraConfig]:
    """PEFT's `add_weighted_adapter` by name: "linear", "cat" or "svd" (which needs `rank`)."""
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type must be one of {sorted(COMBINATIONS)}, got {combination_type!r}")
    if combination_type == "svd":
        if rank is None:
            raise ValueError("svd combination needs rank=; e.g. the largest of the adapters' ranks")
        return svd(adapters, configs, weights, rank)
    return COMBINATIONS[combination_type](adapters, configs, weights)
