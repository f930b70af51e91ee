"""The LoRA paper's Section 7 analysis of trained adapters, as plain functions over adapter trees (numpy, float64).

Layout: an adapted kernel W is (in, out), its adapter A (in, r) and B (r, out), and dW = scale * A @ B (in, out).
The paper writes dW = B A with A (r, in); its "right-singular vectors of A" are the left-singular vectors of our A.

- `subspace_similarity(a1, a2)`: phi(i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j) in [0, 1] for every i <= r1,
  j <= r2, where Uk are A_k's left-singular vectors by decreasing singular value (the paper's Figure 3: how much of
  the top-i directions of one adapter the top-j directions of another contain).
- `delta_spectrum(a, b, scale)`: the singular values of dW, computed from r x r matrices (dW is never formed).
- `amplification(w, a, b, scale)`: the paper's Table 7 / Figure 4 numbers: ||dW||_F, ||U^T W V||_F with U, V dW's
  singular vectors (how strongly W already had dW's directions), the same for random U, V, and the amplification
  factor ||dW||_F / ||U^T W V||_F.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from lora_jax.lora.config import LoraConfig
from lora_jax.lora.transform import LORA_A, LORA_B
from lora_jax.tree import flatten_paths


def left_singular_vectors(a: np.ndarray) -> np.ndarray:
    """(in, r) -> the orthonormal (in, r) left-singular vectors of `a`, by decreasing singular value."""
    u, _, _ = np.linalg.svd(np.asarray(a, np.float64), full_matrices=False)
    return u


def subspace_similarity(a1: np.ndarray, a2: np.ndarray) -> np.ndarray:
    """phi (r1, r2): entry [i-1, j-1] is ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j) for A1 (in, r1), A2 (in, r2)."""
    overlap = (left_singular_vectors(a1).T @ left_singular_vectors(a2)) ** 2  # (r1, r2)
    cumulative = overlap.cumsum(0).cumsum(1)
    r1, r2 = overlap.shape
    return cumulative / np.minimum.outer(np.arange(1, r1 + 1), np.arange(1, r2 + 1))


def delta_svd(a: np.ndarray, b: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U (in, r), s (r,), V (out, r)) with scale * a @ b = U diag(s) V^T, via QR of both factors (O((in+out) r^2))."""
    qa, ra = np.linalg.qr(np.asarray(a, np.float64))
    qb, rb = np.linalg.qr(np.asarray(b, np.float64).T)
    u, s, vt = np.linalg.svd(scale * ra @ rb.T)
    return qa @ u, s, qb @ vt.T


def delta_spectrum(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """The singular values (r,) of dW = scale * a @ b, decreasing."""
    return delta_svd(a, b, scale)[1]


def amplification(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float, seed: int = 0) -> dict:
    """How dW = scale * a @ b relates to the frozen W (in, out), in the top-r directions of dW."""
    w = np.asarray(w, np.float64)
    u, s, v = delta_svd(a, b, scale)
    rng = np.random.default_rng(seed)
    ru, _ = np.linalg.qr(rng.standard_normal((w.shape[0], len(s))))
    rv, _ = np.linalg.qr(rng.standard_normal((w.shape[1], len(s))))
    delta_norm = float(np.sqrt((s**2).sum()))
    projected = float(np.linalg.norm(u.T @ w @ v))
    return {"delta_norm": delta_norm, "w_norm": float(np.linalg.norm(w)), "w_in_delta_directions": projected,
            "w_in_random_directions": float(np.linalg.norm(ru.T @ w @ rv)),
            "amplification": delta_norm / projected if projected > 0 else float("inf")}


def adapter_factors(adapter: Mapping, config: LoraConfig, layers: str | None = None) -> dict[str, tuple]:
    """{module path: (A, B, scale)} of every adapted module (whose path matches regex `layers`, when given)."""
    flat = flatten_paths(adapter)
    out = {}
    for key in sorted(k for k in flat if k.endswith("/" + LORA_A)):
        module = key.rsplit("/", 1)[0]
        if layers is None or re.search(layers, module):
            out[module] = (np.asarray(flat[key]), np.asarray(flat[f"{module}/{LORA_B}"]), config.scale_for(module))
    return out


def analyze_adapter(adapter: Mapping, config: LoraConfig, base_params: Mapping | None = None,
                    layers: str | None = None) -> dict[str, dict]:
    """Per adapted module: rank, dW's singular values and cumulative energy; with the base, the amplification."""
    base = flatten_paths(base_params) if base_params is not None else {}
    report = {}
    for module, (a, b, scale) in adapter_factors(adapter, config, layers).items():
        s = delta_spectrum(a, b, scale)
        energy = np.cumsum(s**2) / max(float((s**2).sum()), 1e-300)
        entry = {"rank": int(a.shape[1]), "singular_values": s.tolist(), "cumulative_energy": energy.tolist()}
        if f"{module}/kernel" in base:
            entry.update(amplification(np.asarray(base[f"{module}/kernel"]), a, b, scale))
        report[module] = entry
    return report


def compare_adapters(adapter1: Mapping, config1: LoraConfig, adapter2: Mapping, config2: LoraConfig,
                     layers: str | None = None) -> dict[str, np.ndarray]:
    """{module: phi (r1, r2)} for every module both adapters adapt (the paper's Figure 3 for each)."""
    f1, f2 = adapter_factors(adapter1, config1, layers), adapter_factors(adapter2, config2, layers)
    return {m: subspace_similarity(f1[m][0], f2[m][0]) for m in f1 if m in f2}
