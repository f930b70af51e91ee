"""The train state and the jitted train / eval steps, for LoRA and full fine-tuning through one code path.

`TrainState` keeps the trainable leaves (adapters, or everything in full fine-tuning) apart from the frozen ones.
The loss is differentiated with respect to `trainable` only, so XLA never builds gradients for frozen kernels, and the
optimizer state covers only trainable leaves. The state is donated to the step: updated leaves reuse their buffers and
frozen leaves pass through untouched (no copy per step).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from lora_jax.lora.apply import with_lora
from lora_jax.lora.config import LoraConfig
from lora_jax.lora.transform import combine, split_trainable

Batch = Mapping[str, jax.Array]
IGNORE = -100
# Dropout masks are the costliest non-matmul work of a train step. Philox-4x32-10 (Random123; what cuRAND and
# PyTorch's CUDA dropout use) lowers to plain integer ops that XLA fuses into the mask's consumer: on CPU a (4, 12, 256, 256)
# mask costs ~5 ms against ~35 ms with threefry2x32 or RngBitGenerator (2-core benchmark CPU, bench/).
PREFERRED_DROPOUT_RNG = ("philox4x32", "unsafe_rbg")


@functools.cache
def default_dropout_rng_impl() -> str:
    """The first PRNG implementation of PREFERRED_DROPOUT_RNG this jax has (older jax lacks philox4x32)."""
    for impl in PREFERRED_DROPOUT_RNG:
        try:
            jax.random.key(0, impl=impl)
        except (ValueError, KeyError, TypeError):
            continue
        return impl
    return "threefry2x32"


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any
    frozen: Any
    opt_state: Any
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @property
    def params(self) -> dict:
        """The full parameter tree (frozen + trainable)."""
        return combine(self.frozen, self.trainable)


def create_train_state(
    params: Mapping, lora_config: LoraConfig | None, tx: optax.GradientTransformation, full_finetune: bool = False
) -> TrainState:
    """Splits `params` (already holding adapters, see `init_lora`) and initialises `tx` on the trainable part."""
    if lora_config is None and not full_finetune:
        raise ValueError("create_train_state needs a LoraConfig, or full_finetune=True")
    trainable, frozen = split_trainable(params, lora_config, full_finetune)
    if not jax.tree_util.tree_leaves(trainable):
        raise ValueError("nothing to train: params hold no LoRA adapters (call init_lora first) and no modules_to_save")
    # The step donates trainable buffers; copy them so the caller's params tree stays valid.
    trainable = jax.tree_util.tree_map(jnp.array, trainable)
    return TrainState(jnp.zeros((), jnp.int32), trainable, frozen, tx.init(trainable), tx)


def token_losses(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Per-token label-smoothed cross-entropy (B, T) and the 0/1 mask of counted tokens (labels != -100).

    With smoothing e over V classes: (1 - e) * nll + e * mean_v(-log p_v), as in PyTorch's CrossEntropyLoss."""
    mask = labels != IGNORE
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(mask, labels, 0)[..., None], axis=-1)[..., 0]
    loss = nll if label_smoothing == 0.0 else (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    return jnp.where(mask, loss, 0.0), mask.astype(jnp.float32)


def _forward(model, params, batch: Batch, dropout_rng):
    kwargs = {}
    if dropout_rng is not None:
        kwargs = dict(deterministic=False, rngs={"dropout": dropout_rng})
    return model.apply(
        {"params": params},
        batch["input_ids"],
        batch["attention_mask"],
        batch["decoder_input_ids"],
        batch.get("decoder_attention_mask"),
        **kwargs,
    )


def _split_micro(batch: Batch, n: int) -> Batch:
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum_steps={n}")
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])

    return {k: split(v) for k, v in batch.items()}


def make_train_step(
    model,
    lora_config: LoraConfig | None,
    *,
    label_smoothing: float = 0.0,
    grad_accum_steps: int = 1,
    max_grad_norm: float | None = None,
    schedule: optax.Schedule | None = None,
    jit: bool = True,
    shardings: tuple | None = None,
    dropout_rng_impl: str | None = "default",
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict]]:
    """Returns `train_step(state, batch, rng) -> (state, metrics)`.

    batch: int32 arrays input_ids, attention_mask (B, S); decoder_input_ids, labels (B, T) (-100 = ignored),
      optional decoder_attention_mask (B, T). With grad_accum_steps = k, B is split into k micro-batches run one after
      another (lax.scan); the gradient is the token-weighted mean over all B rows, exactly the full-batch gradient.
    metrics: loss (mean over tokens), tokens, grad_norm (before clipping), learning_rate (when `schedule` is given).

    jit=True compiles the update with the step counter, trainable leaves and optimizer state donated (their buffers
    are reused in place); frozen leaves are an input only, never donated (the caller's base params stay valid) and
    never copied. `train_step.num_compilations()` says how many shapes were compiled. jit=False gives the same
    computation un-jitted. shardings = (state_shardings, batch_sharding) jits with explicit shardings, where
    state_shardings is a TrainState-shaped tree of shardings (see lora_jax.sharding).
    dropout_rng_impl: the jax PRNG implementation drawing dropout masks inside the step ("default":
    `default_dropout_rng_impl()`); None draws them from `rng`'s own implementation.
    """
    apply_model = with_lora(model, lora_config)
    if dropout_rng_impl == "default":
        dropout_rng_impl = default_dropout_rng_impl()

    def summed_loss(trainable, frozen, micro, rng):
        logits = _forward(apply_model, combine(frozen, trainable), micro, rng)
        losses, mask = token_losses(logits, micro["labels"], label_smoothing)
        return losses.sum(), mask.sum()

    def update(step, trainable, opt_state, frozen, batch, rng, tx):
        rng = jax.random.fold_in(rng, step)
        if dropout_rng_impl is not None:
            rng = jax.random.key(jax.random.bits(rng, (), jnp.uint32), impl=dropout_rng_impl)
        micro = _split_micro(batch, grad_accum_steps)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
        scalar = jnp.zeros((), jnp.float32)
        (grads, loss_sum, tokens), _ = jax.lax.scan(
            _accumulate_body(summed_loss, trainable, frozen, rng), (zeros, scalar, scalar), (micro, jnp.arange(grad_accum_steps))
        )
        denom = jnp.maximum(tokens, 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
        grad_norm = optax.tree.norm(grads)
        if max_grad_norm is not None:
            factor = jnp.minimum(1.0, max_grad_norm / (grad_norm + 1e-6))
            grads = jax.tree_util.tree_map(lambda g: g * factor, grads)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": loss_sum / denom, "tokens": tokens, "grad_norm": grad_norm}
        if schedule is not None:
            metrics["learning_rate"] = schedule(step)
        return step + 1, trainable, opt_state, metrics

    if jit:
        kwargs = {}
        if shardings is not None:
            state_sh, batch_sh = shardings
            replicated = jax.sharding.NamedSharding(batch_sh.mesh, jax.sharding.PartitionSpec())
            kwargs = dict(
                in_shardings=(state_sh.step, state_sh.trainable, state_sh.opt_state, state_sh.frozen, batch_sh, replicated),
                out_shardings=(state_sh.step, state_sh.trainable, state_sh.opt_state, replicated),
            )
        compiled = {}

        def run(state, batch, rng):
            fn = compiled.get(id(state.tx))
            if fn is None:  # tx is static data, bound once per optimizer
                fn = compiled[id(state.tx)] = jax.jit(
                    lambda *a: update(*a, state.tx), donate_argnums=(0, 1, 2), **kwargs
                )
            return fn(state.step, state.trainable, state.opt_state, state.frozen, batch, rng)

        num_compilations = lambda: sum(f._cache_size() for f in compiled.values())
    else:
        run = lambda state, batch, rng: update(state.step, state.trainable, state.opt_state, state.frozen, batch, rng, state.tx)
        num_compilations = lambda: 0

    def train_step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, dict]:
        step, trainable, opt_state, metrics = run(state, batch, rng)
        return state.replace(step=step, trainable=trainable, opt_state=opt_state), metrics

    train_step.num_compilations = num_compilations
    return train_step


def _accumulate_body(summed_loss, trainable, frozen, rng):
    value_and_grad = jax.value_and_grad(summed_loss, has_aux=True)

    def body(carry, xs):
        grads, loss, tokens = carry
        micro, i = xs
        (l, n), g = value_and_grad(trainable, frozen, micro, jax.random.fold_in(rng, i))
        return (jax.tree_util.tree_map(jnp.add, grads, g), loss + l, tokens + n), None

    return body


def make_eval_step(model, lora_config: LoraConfig | None = None, *, jit: bool = True):
    """Returns `eval_step(params, batch) -> {"loss_sum", "tokens"}` (no dropout, no smoothing); the caller divides
    summed losses by summed tokens over the whole split."""
    apply_model = with_lora(model, lora_config)

    def eval_step(params, batch: Batch):
        logits = _forward(apply_model, params, batch, None)
        losses, mask = token_losses(logits, batch["labels"])
        if "example_mask" in batch:
            row = batch["example_mask"].astype(jnp.float32)[:, None]
            losses, mask = losses * row, mask * row
        return {"loss_sum": losses.sum(), "tokens": mask.sum()}

    return jax.jit(eval_step) if jit else eval_step
