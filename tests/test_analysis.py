"""The paper's Section 7 analysis: subspace similarity, dW's spectrum, amplification, and the CLI on trained adapters."""

import json

import jax
import numpy as np
import optax
import pytest

import lora_jax
from lora_jax.lora import analysis
from lora_jax.lora import LoraConfig
from train import analyze


def test_phi_is_one_for_identical_adapters():
    a = np.random.default_rng(0).standard_normal((32, 6))
    np.testing.assert_allclose(analysis.subspace_similarity(a, a), np.ones((6, 6)), atol=1e-12)


def test_phi_matches_a_hand_computed_pair():
    e = np.eye(4)
    a1 = np.stack([2 * e[0], e[1]], axis=1)  # top direction e1, then e2
    a2 = np.stack([3 * e[0], (e[1] + e[2]) / np.sqrt(2)], axis=1)  # top direction e1, then (e2 + e3)/sqrt(2)
    # phi(1,1) = (e1.e1)^2 = 1; phi(1,2) = phi(2,1) = 1; phi(2,2) = (1 + (e2.(e2+e3)/sqrt 2)^2) / 2 = 0.75
    np.testing.assert_allclose(analysis.subspace_similarity(a1, a2), [[1.0, 1.0], [1.0, 0.75]], atol=1e-12)
    # orthogonal subspaces: 0
    np.testing.assert_allclose(analysis.subspace_similarity(e[:, :1], e[:, 1:3]), [[0.0, 0.0]], atol=1e-12)


def test_spectrum_equals_the_dense_svd():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((40, 5)), rng.standard_normal((5, 24))
    dense = np.linalg.svd(0.5 * a @ b, compute_uv=False)[:5]
    np.testing.assert_allclose(analysis.delta_spectrum(a, b, 0.5), dense, rtol=1e-10)
    u, s, v = analysis.delta_svd(a, b, 0.5)
    np.testing.assert_allclose(u @ np.diag(s) @ v.T, 0.5 * a @ b, atol=1e-10)


def test_amplification_by_hand():
    w = np.diag([3.0, 2.0, 1.0])
    a, b = np.array([[1.0], [0.0], [0.0]]), np.array([[2.0, 0.0, 0.0]])  # dW = 2 e1 e1^T, where W has 3
    out = analysis.amplification(w, a, b, scale=1.0)
    assert out["delta_norm"] == pytest.approx(2.0) and out["w_in_delta_directions"] == pytest.approx(3.0)
    assert out["amplification"] == pytest.approx(2.0 / 3.0) and out["w_norm"] == pytest.approx(np.sqrt(14.0))


def _train_adapter(model, params, batch, config, seed, path):
    adapted = lora_jax.init_lora(params, config, jax.random.PRNGKey(seed))
    state = lora_jax.create_train_state(adapted, config, lora_jax.lora_optimizer(optax.adam(1e-2), config))
    step = lora_jax.make_train_step(model, config)
    for i in range(8):
        state, _ = step(state, batch, jax.random.PRNGKey(i))
    lora_jax.save_adapter(str(path), state.params, config, base_model="tiny", base_params=params)
    return str(path)


def test_cli_writes_the_json_and_the_pngs_for_two_trained_adapters(tiny, batch, tmp_path):
    model, params = tiny
    from tests.conftest import MODEL_DIR

    r4 = _train_adapter(model, params, batch, LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")), 0,
                        tmp_path / "r4" / "adapter")
    r2 = _train_adapter(model, params, batch, LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")), 1,
                        tmp_path / "r2" / "adapter")
    out = tmp_path / "analysis"
    assert analyze.main(["--adapter", r4, "--compare", r2, "--base", MODEL_DIR, "--out", str(out)]) == 0
    for name in ("analysis.json", "spectrum.png", "subspace_similarity.png"):
        assert (out / name).stat().st_size > 0, name
    result = json.loads((out / "analysis.json").read_text())
    module = "model/encoder/layers/0/self_attn/q_proj"
    entry = result["modules"][module]
    assert entry["rank"] == 4 and len(entry["singular_values"]) == 4 and entry["cumulative_energy"][-1] == pytest.approx(1.0)
    assert entry["amplification"] > 0 and entry["delta_norm"] > 0
    phi = np.asarray(result["subspace_similarity"][module])
    assert phi.shape == (4, 2) and np.all((phi >= -1e-12) & (phi <= 1 + 1e-12))
    assert analyze.main(["--adapter", r4, "--layers", "no_such_module", "--out", str(out)]) == 2
