"""The memory-bandwidth floor of a decoding step (issue 25): the machine's read bandwidth measured in the same run, and
the bytes one beam-search step must read.

A decode step of an encoder-decoder reads every decoder weight it multiplies by (self-attention q, k, v, o;
cross-attention q, o — the cross-attention keys/values were projected once, before the loop; fc1, fc2), the LM head
(vocab x d_model), the self-attention cache over all its slots (attention runs over the whole fixed-size cache) and
the cross-attention keys/values (one row per input, shared by its beams). At B x beams hypotheses of one token each
the matmuls are matrix-vector-like, so the step cannot be faster than those bytes / bandwidth.
"""

from __future__ import annotations

from typing import Any, Mapping

BANDWIDTH_BYTES = 256 * 2**20  # larger than any CPU's last-level cache


def decode_step_bytes(fields: Mapping[str, Any], batch: int, beams: int, source_len: int, length: int,
                      kernel_bytes: float = 4.0, head_bytes: float = 4.0) -> dict[str, float]:
    """Bytes one decoding step reads, by part. `fields`: the model's config fields (d_model, decoder_layers,
    decoder_ffn_dim, vocab_size); `length`: the self-attention cache's slots (max new tokens + 1);
    kernel_bytes / head_bytes: bytes per stored weight of the decoder kernels / the LM head (4 float32, 1 int8)."""
    d, layers, ffn, vocab = fields["d_model"], fields["decoder_layers"], fields["decoder_ffn_dim"], fields["vocab_size"]
    per_layer = (4 + 2) * d * d + 2 * d * ffn  # self q,k,v,o + cross q,o + fc1, fc2
    parts = {
        "decoder_weights": layers * per_layer * kernel_bytes + layers * (13 * d + ffn) * 4,  # + biases and norms
        "lm_head": vocab * d * head_bytes + vocab * 4,  # + final_logits_bias
        "self_cache": 2 * layers * batch * beams * length * d * 4,
        "cross_cache": 2 * layers * batch * source_len * d * 4,
    }
    parts["total"] = sum(parts.values())
    return parts


def measure_bandwidth(repeats: int = 10, nbytes: int = BANDWIDTH_BYTES) -> dict[str, float]:
    """Read bandwidth (GB/s) as JAX reaches it on the default device: a jitted sum over `nbytes` of float32, and a
    jitted matrix-vector product over a square float32 matrix of `nbytes` (the decode step's access pattern, run on
    every core). `bandwidth_gb_per_s` is the faster of the two, the floor's denominator."""
    import jax
    import jax.numpy as jnp

    from bench.common import median_time

    n = int((nbytes // 4) ** 0.5)
    matrix = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    vector = jnp.ones((n,), jnp.float32)
    flat = matrix.reshape(-1)
    total = jax.jit(jnp.sum)
    matvec = jax.jit(jnp.matmul)
    sum_s, _ = median_time(lambda: total(flat).block_until_ready(), repeats, warmup=2)
    matvec_s, _ = median_time(lambda: matvec(matrix, vector).block_until_ready(), repeats, warmup=2)
    read = float(matrix.nbytes)
    rates = {"sum_gb_per_s": read / sum_s / 1e9, "matvec_gb_per_s": read / matvec_s / 1e9}
    return {**rates, "bandwidth_gb_per_s": max(rates.values()), "bandwidth_array_bytes": read}
