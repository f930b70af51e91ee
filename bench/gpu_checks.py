"""The GPU test subset of `python -m bench.gpu`: lora_jax on the accelerator checked against the same code on the host
CPU in one process (seeded bench weights, `spec`'s architecture), each check a record with a measured value, a stated
tolerance and a status.

- forward parity: float32 logits on the accelerator vs on the CPU, both at matmul precision "highest" (GPUs would
  otherwise use TF32 for float32 matmuls);
- generation parity: 4-beam ids on the accelerator identical to the CPU's (EOS blocked, so every step counts);
- cuDNN attention: `attention="cudnn"` in bfloat16 is really lowered to cuDNN's fused attention (its custom call
  is in the compiled program), and its logits and gradients agree with XLA's attention in bfloat16;
- bfloat16: bfloat16 compute over float32 weights against float32 (logits, first train-step loss).

On a CPU-only machine (the dry run) the "accelerator" is the CPU itself: the checks run end to end and agree
trivially, and the cuDNN check is skipped with that reason. Runs as the `gpu_checks` system of `bench.worker`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from bench.common import BenchSpec
from bench.jax_bench import backend_fields, build_model, device_batch, generation_config, lora_config
from lora_jax.generation import generate_padded
from lora_jax.training.step import token_losses

# Tolerances (why these values): float32 at "highest" precision differs between devices only by summation order,
# ~1e-6 relative on logits of size ~1; bfloat16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%), and the error
# of a 12-layer network in bf16 is a few of those steps relative to the logits' spread.
FP32_LOGIT_ATOL = 1e-3
BF16_REL_ERROR = 0.05      # mean |bf16 - fp32| / std(fp32 logits)
CUDNN_REL_ERROR = 0.02     # cuDNN vs XLA attention, both bf16: mean |diff| / std(logits), and relative gradient norm
BF16_LOSS_REL = 0.01       # first train-step loss, bf16 compute vs fp32


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    status: str            # "pass", "fail" or "skipped"
    value: float | None
    tolerance: str
    detail: str = ""


def _on(device: jax.Device, tree):
    return jax.device_put(tree, device)


def _forward(model):
    return jax.jit(lambda p, b: model.apply({"params": p}, b["input_ids"], b["attention_mask"], b["decoder_input_ids"]))


def _rel(a: jax.Array, b: jax.Array) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.mean(np.abs(a - b)) / (np.std(b) + 1e-12))


def forward_parity(model, params, batch, accel: jax.Device, cpu: jax.Device) -> Check:
    fwd = _forward(model)
    with jax.default_matmul_precision("highest"):
        on_accel = np.asarray(fwd(_on(accel, params), _on(accel, batch)))
        with jax.default_device(cpu):
            on_cpu = np.asarray(fwd(_on(cpu, params), _on(cpu, batch)))
    gap = float(np.max(np.abs(on_accel - on_cpu)))
    return Check("forward parity, fp32 logits vs CPU", "pass" if gap <= FP32_LOGIT_ATOL else "fail", gap,
                 f"max abs diff <= {FP32_LOGIT_ATOL:g}", f"logits {list(on_cpu.shape)}")


def generation_parity(model, params, batch, spec: BenchSpec, accel: jax.Device, cpu: jax.Device) -> Check:
    cfg = generation_config(spec)

    def run(device):
        with jax.default_device(device):
            p, b = _on(device, params), _on(device, batch)
            return np.asarray(generate_padded(model, p, b["input_ids"], b["attention_mask"], generation_config=cfg))

    with jax.default_matmul_precision("highest"):
        on_accel, on_cpu = run(accel), run(cpu)
    same = float(np.mean(on_accel == on_cpu))
    return Check(f"generation parity, {spec.num_beams}-beam ids vs CPU", "pass" if same == 1.0 else "fail", same,
                 "fraction of identical ids == 1", f"ids {list(on_cpu.shape)}")


def _loss(model) -> Callable:
    def loss(params, batch):
        logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
        losses, mask = token_losses(logits.astype(jnp.float32), batch["labels"])
        return losses.sum() / mask.sum()
    return loss


def cudnn_attention(model, params, batch, accel: jax.Device) -> list[Check]:
    if accel.platform != "gpu":
        reason = f"no GPU (device platform {accel.platform!r}); cuDNN attention exists only on NVIDIA GPUs"
        return [Check("cuDNN attention path", "skipped", None, "custom call present", reason)]
    params, batch = _on(accel, params), _on(accel, batch)
    xla, cudnn = model.clone(dtype=jnp.bfloat16, attention="xla"), model.clone(dtype=jnp.bfloat16, attention="cudnn")
    try:
        hlo = _forward(cudnn).lower(params, batch).compile().as_text()
        ref_logits, cudnn_logits = _forward(xla)(params, batch), _forward(cudnn)(params, batch)
        grad_xla = jax.jit(jax.grad(_loss(xla)))(params, batch)
        grad_cudnn = jax.jit(jax.grad(_loss(cudnn)))(params, batch)
    except Exception as e:  # jax raises for shapes/dtypes cuDNN lacks: that is this check's finding
        return [Check("cuDNN attention path", "fail", None, "compiles and runs", f"{type(e).__name__}: {e}"[:500])]
    lowered = "cudnn" in hlo.lower() and "fmha" in hlo.lower()
    diff = jax.tree_util.tree_map(lambda a, b: jnp.sum((a.astype(jnp.float32) - b.astype(jnp.float32)) ** 2), grad_cudnn, grad_xla)
    norm = jax.tree_util.tree_map(lambda b: jnp.sum(b.astype(jnp.float32) ** 2), grad_xla)
    grad_rel = float(jnp.sqrt(sum(jax.tree_util.tree_leaves(diff)) / sum(jax.tree_util.tree_leaves(norm))))
    logit_rel = _rel(cudnn_logits, ref_logits)
    return [
        Check("cuDNN attention lowered to cuDNN fused attention", "pass" if lowered else "fail", float(lowered),
              "cuDNN fmha custom call in the compiled forward", ""),
        Check("cuDNN attention logits vs XLA attention (bf16)", "pass" if logit_rel <= CUDNN_REL_ERROR else "fail",
              logit_rel, f"mean abs diff / std <= {CUDNN_REL_ERROR:g}"),
        Check("cuDNN attention gradients vs XLA attention (bf16)", "pass" if grad_rel <= CUDNN_REL_ERROR * 5 else "fail",
              grad_rel, f"relative gradient-norm error <= {CUDNN_REL_ERROR * 5:g}"),
    ]


def bf16_checks(model, params, batch, spec: BenchSpec, accel: jax.Device) -> list[Check]:
    params, batch = _on(accel, params), _on(accel, batch)
    fp32 = _forward(model)(params, batch)
    bf16 = _forward(model.clone(dtype=jnp.bfloat16))(params, batch)
    logit_rel = _rel(bf16, fp32)
    lora = lora_config(spec)
    losses = {}
    for name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        adapted = lora_jax.init_lora(params, lora, jax.random.PRNGKey(1))
        tx = lora_jax.lora_optimizer(optax.adamw(1e-4), lora)
        state = lora_jax.create_train_state(adapted, lora, tx)
        step = lora_jax.make_train_step(model.clone(dtype=dtype), lora)
        _, metrics = step(state, batch, jax.random.PRNGKey(2))
        losses[name] = float(metrics["loss"])
    loss_rel = abs(losses["bf16"] - losses["fp32"]) / abs(losses["fp32"])
    finite = bool(np.isfinite(losses["bf16"]))
    return [
        Check("bf16 compute logits vs fp32", "pass" if logit_rel <= BF16_REL_ERROR else "fail", logit_rel,
              f"mean abs diff / std <= {BF16_REL_ERROR:g}"),
        Check("bf16 LoRA train-step loss vs fp32", "pass" if finite and loss_rel <= BF16_LOSS_REL else "fail",
              loss_rel, f"finite, relative diff <= {BF16_LOSS_REL:g}", f"losses {losses}"),
    ]


def bench_gpu_checks(spec: BenchSpec) -> dict[str, Any]:
    """Every check on the default device (the GPU when there is one) against the host CPU."""
    accel, cpu = jax.devices()[0], jax.devices("cpu")[0]
    with jax.default_device(cpu):  # the seeded weights are built on the host, then copied where each check needs them
        model, params = build_model(spec)
        batch = device_batch(spec)
    checks = [forward_parity(model, params, batch, accel, cpu),
              generation_parity(model, params, batch, spec, accel, cpu),
              *cudnn_attention(model, params, batch, accel),
              *bf16_checks(model, params, batch, spec, accel)]
    failed = [c.name for c in checks if c.status == "fail"]
    return {"system": "gpu_checks", **backend_fields(), "kind": "checks", "checks": [dataclasses.asdict(c) for c in checks],
            "failed": failed, "passed": not failed}
