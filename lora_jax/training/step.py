"""The train state, a pure train update and the jitted train / eval steps, for LoRA and full fine-tuning alike.

`TrainState` keeps the trainable leaves (adapters, or everything in full fine-tuning) apart from the frozen ones.
The loss is differentiated with respect to `trainable` only, so XLA never builds gradients for frozen kernels, and the
optimizer state covers only trainable leaves.

`train_update(state, batch, rng, *, model, ...)` is the whole step as a pure function, to jit yourself as in the Flax
examples (`jax.jit(functools.partial(train_update, model=m, ...))`). `make_train_step` is the convenience wrapper the
trainer uses: it jits the update with the step counter, trainable leaves and optimizer state donated (updated leaves
reuse their buffers) while frozen leaves pass through as a plain input (never donated, never copied).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from lora_jax.training import compile_events
from lora_jax.lora.apply import with_lora
from lora_jax.lora.config import LoraConfig
from lora_jax.lora.transform import combine, split_trainable
from lora_jax.models import layer_stack
from lora_jax.models.bart import IGNORE
from lora_jax.models.layer_stack import unstack_layers

Batch = Mapping[str, jax.Array]
StepFn = Callable[["TrainState", Batch, jax.Array], tuple["TrainState", dict]]
# Dropout masks are the costliest non-matmul work of a train step. Philox-4x32-10 (Random123; what cuRAND and
# PyTorch's CUDA dropout use) lowers to plain integer ops that XLA fuses into the mask's consumer: on CPU a (4, 12, 256, 256)
# mask costs ~5 ms against ~35 ms with threefry2x32 or RngBitGenerator (2-core benchmark CPU, bench/).
PREFERRED_DROPOUT_RNG = ("philox4x32", "unsafe_rbg")
# philox4x32 does not compile under jit with explicit shardings (jax 0.10, CPU: its 32-bit mulhi reaches XLA's SPMD
# lowering as an unknown op, "Unable to convert MHLO to StableHLO"), so sharded steps skip it.
NOT_SHARDABLE_RNG = ("philox4x32",)


@functools.cache
def default_dropout_rng_impl(sharded: bool = False) -> str:
    """The first PRNG implementation of PREFERRED_DROPOUT_RNG this jax has (older jax lacks philox4x32); with
    sharded=True, the first that also compiles under jit with explicit shardings."""
    for impl in PREFERRED_DROPOUT_RNG:
        if sharded and impl in NOT_SHARDABLE_RNG:
            continue
        try:
            jax.random.key(0, impl=impl)
        except (ValueError, KeyError, TypeError):
            continue
        return impl
    return "threefry2x32"


@flax.struct.dataclass
class TrainState:
    """What a train step updates. step: int32 scalar; trainable / frozen: the params split by `split_trainable`
    (adapters and modules_to_save vs the rest; everything is trainable in full fine-tuning); opt_state: `tx`'s state
    for the trainable leaves only; tx: the optimizer (static: not a pytree leaf)."""

    step: jax.Array
    trainable: Any
    frozen: Any
    opt_state: Any
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @property
    def params(self) -> dict:
        """The full parameter tree (frozen + trainable), in the transformers layout (pre-stacked layers unstacked)."""
        return unstack_layers(combine(self.frozen, self.trainable))


def create_train_state(
    params: Mapping, lora_config: LoraConfig | None, tx: optax.GradientTransformation, full_finetune: bool = False,
    stack_layers: bool = False,
) -> TrainState:
    """Splits `params` (already holding adapters, see `init_lora`) and initialises `tx` on the trainable part.

    stack_layers=True (for a model with `scan_layers=True`) keeps the frozen leaves of each layer stack pre-stacked
    (`lora_jax.models.layer_stack.stack_layers`), so the step scans them in place instead of copying every layer's
    frozen weights into a stack on every call; `state.params` still gives the transformers layout."""
    if lora_config is None and not full_finetune:
        raise ValueError("create_train_state needs a LoraConfig, or full_finetune=True")
    trainable, frozen = split_trainable(params, lora_config, full_finetune)
    if not jax.tree_util.tree_leaves(trainable):
        raise ValueError("nothing to train: params hold no LoRA adapters (call init_lora first) and no modules_to_save")
    # The step donates trainable buffers; copy them so the caller's params tree stays valid.
    trainable = jax.tree_util.tree_map(jnp.array, trainable)
    if stack_layers:
        frozen = layer_stack.stack_layers(frozen)
    return TrainState(jnp.zeros((), jnp.int32), trainable, frozen, tx.init(trainable), tx)


def token_losses(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Per-token label-smoothed cross-entropy (B, T) and the 0/1 mask of counted tokens (labels != IGNORE).

    With smoothing e over V classes: (1 - e) * nll + e * mean_v(-log p_v), as in PyTorch's CrossEntropyLoss.
    Written with logsumexp (nll = lse - logit[label], mean_v(-log p_v) = lse - mean_v(logit)) rather than through
    log_softmax, so no (B, T, V) array of log-probabilities is materialised beside the logits: one vocabulary-wide
    float32 buffer less at the train step's peak (49 MiB at bart-base size, batch 4 x 64 targets)."""
    mask = labels != IGNORE
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    nll = lse - jnp.take_along_axis(logits, jnp.where(mask, labels, 0)[..., None], axis=-1)[..., 0]
    loss = nll if label_smoothing == 0.0 else (1.0 - label_smoothing) * nll + label_smoothing * (lse - logits.mean(-1))
    return jnp.where(mask, loss, 0.0), mask.astype(jnp.float32)


def model_logits(model, params, batch: Batch, dropout_rng: jax.Array | None) -> jax.Array:
    """Logits (B, T, V) of `model` (a linen module or a LoraModel) on a batch; dropout on iff `dropout_rng` is given."""
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


def split_micro_batches(batch: Batch, n: int) -> Batch:
    """Every (B, ...) array -> (n, B / n, ...), the micro-batches `lax.scan` runs through."""

    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum_steps={n}")
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])

    return {k: split(v) for k, v in batch.items()}


def accumulate_gradients(model, trainable, frozen, batch: Batch, rng: jax.Array, *, label_smoothing: float,
                         grad_accum_steps: int) -> tuple[Any, jax.Array, jax.Array]:
    """(summed gradient tree like `trainable`, summed token loss, token count) over `grad_accum_steps` micro-batches
    run one after another (`lax.scan`), so peak memory is that of one micro-batch."""

    def summed_loss(trainable, micro, dropout_rng):
        logits = model_logits(model, combine(frozen, trainable), micro, dropout_rng)
        losses, mask = token_losses(logits, micro["labels"], label_smoothing)
        return losses.sum(), mask.sum()

    value_and_grad = jax.value_and_grad(summed_loss, has_aux=True)

    def add_micro_batch(carry, xs):
        grads, loss, tokens = carry
        micro, i = xs
        (micro_loss, micro_tokens), micro_grads = value_and_grad(trainable, micro, jax.random.fold_in(rng, i))
        return (jax.tree_util.tree_map(jnp.add, grads, micro_grads), loss + micro_loss, tokens + micro_tokens), None

    zero = jnp.zeros((), jnp.float32)
    init = (jax.tree_util.tree_map(jnp.zeros_like, trainable), zero, zero)
    xs = (split_micro_batches(batch, grad_accum_steps), jnp.arange(grad_accum_steps))
    (grads, loss_sum, tokens), _ = jax.lax.scan(add_micro_batch, init, xs)
    return grads, loss_sum, tokens


def _dropout_key(rng: jax.Array, impl: str | None) -> jax.Array:
    # A fresh key of the faster PRNG implementation, seeded from `rng` (None keeps `rng`'s own implementation).
    if impl is None:
        return rng
    return jax.random.key(jax.random.bits(rng, (), jnp.uint32), impl=impl)


def train_update(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    *,
    model,
    label_smoothing: float = 0.0,
    grad_accum_steps: int = 1,
    max_grad_norm: float | None = None,
    schedule: optax.Schedule | None = None,
    dropout_rng_impl: str | None = None,
) -> tuple[TrainState, dict]:
    """One optimizer step, as a pure function -> (new state, metrics).

    model: what computes the logits, e.g. `with_lora(bart, lora_config)` (a LoraModel) or the plain module.
    batch: int32 arrays input_ids, attention_mask (B, S); decoder_input_ids, labels (B, T) (IGNORE = -100 not
      counted), optional decoder_attention_mask (B, T). With grad_accum_steps = k, B is split into k micro-batches;
      the gradient is the token-weighted mean over all B rows, exactly the full-batch gradient.
    rng: the run's key; the step folds in `state.step`, so the same key can be passed every step.
    metrics: loss (mean over tokens), tokens, grad_norm (before clipping), finite (bool: loss and grad_norm are
      finite; when not, every gradient entry is NaN), learning_rate (when `schedule` is given).
    Every keyword argument is static: bind them with functools.partial before `jax.jit`.
    """
    rng = _dropout_key(jax.random.fold_in(rng, state.step), dropout_rng_impl)
    grads, loss_sum, tokens = accumulate_gradients(model, state.trainable, state.frozen, batch, rng,
                                                   label_smoothing=label_smoothing, grad_accum_steps=grad_accum_steps)
    denom = jnp.maximum(tokens, 1.0)
    # Every gradient keeps its leaf's dtype: a float32 factor would promote a bfloat16 leaf's gradient (a
    # modules_to_save leaf of a bfloat16 base), and the optimizer state it feeds would change dtype after the first
    # step, compiling the step a second time.
    grads = jax.tree_util.tree_map(lambda g: (g / denom).astype(g.dtype), grads)
    grad_norm = optax.tree.norm(grads)
    loss = loss_sum / denom
    # A non-finite loss or norm poisons the whole gradient, so a non-finite guard around `tx`
    # (`optax.apply_if_finite`, as `python -m train` uses) skips the step even where single entries are finite.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    grads = jax.tree_util.tree_map(lambda g: jnp.where(finite, g, jnp.nan), grads)
    if max_grad_norm is not None:
        factor = jnp.minimum(1.0, max_grad_norm / (grad_norm + 1e-6))
        grads = jax.tree_util.tree_map(lambda g: (g * factor).astype(g.dtype), grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {"loss": loss, "tokens": tokens, "grad_norm": grad_norm, "finite": finite}
    if schedule is not None:
        metrics["learning_rate"] = schedule(state.step)
    return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics


def _jit_kwargs(shardings: tuple | None) -> dict:
    """in/out shardings of the jitted update's (step, trainable, opt_state, frozen, batch, rng) -> (step, trainable,
    opt_state, metrics), from shardings = (TrainState-shaped tree of shardings, batch sharding)."""
    if shardings is None:
        return {}
    state_sh, batch_sh = shardings
    replicated = jax.sharding.NamedSharding(batch_sh.mesh, jax.sharding.PartitionSpec())
    return dict(
        in_shardings=(state_sh.step, state_sh.trainable, state_sh.opt_state, state_sh.frozen, batch_sh, replicated),
        out_shardings=(state_sh.step, state_sh.trainable, state_sh.opt_state, replicated),
    )


def jit_train_update(update: Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict]],
                     shardings: tuple | None = None) -> StepFn:
    """Jits `update(state, batch, rng)` with the step, trainable leaves and optimizer state donated and the frozen
    leaves a plain input. The optimizer `state.tx` is a static argument: one compilation per optimizer and shape.
    The returned step's `num_compilations()` counts its XLA compilations and `compile_stats()` gives their count,
    seconds and persistent-cache hits (`lora_jax.training.compile_events`)."""

    def update_parts(step, trainable, opt_state, frozen, batch, rng, tx):
        new, metrics = update(TrainState(step, trainable, frozen, opt_state, tx), batch, rng)
        return new.step, new.trainable, new.opt_state, metrics

    update_parts.__name__ = update_parts.__qualname__ = compile_events.unique_name("lora_jax_train_step")
    jitted = jax.jit(update_parts, static_argnums=6, donate_argnums=(0, 1, 2), **_jit_kwargs(shardings))

    def train_step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, dict]:
        step, trainable, opt_state, metrics = jitted(
            state.step, state.trainable, state.opt_state, state.frozen, batch, rng, state.tx
        )
        return state.replace(step=step, trainable=trainable, opt_state=opt_state), metrics

    train_step.num_compilations = lambda: compile_events.compilations(update_parts.__name__)
    train_step.compile_stats = lambda: compile_events.stats(update_parts.__name__)
    return train_step


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
) -> StepFn:
    """Returns `train_step(state, batch, rng) -> (state, metrics)`: `train_update` on `with_lora(model, lora_config)`
    with these settings (see `train_update` for batch and metrics).

    jit=True compiles it with `jit_train_update` (trainable leaves and optimizer state donated, frozen leaves never
    donated or copied); `train_step.num_compilations()` says how many shapes were compiled. jit=False gives the same
    computation un-jitted. shardings = (state_shardings, batch_sharding) jits with explicit shardings, where
    state_shardings is a TrainState-shaped tree of shardings (see lora_jax.sharding).
    dropout_rng_impl: the jax PRNG implementation drawing dropout masks inside the step ("default":
    `default_dropout_rng_impl(sharded=shardings is not None)`); None draws them from `rng`'s own implementation.
    """
    if dropout_rng_impl == "default":
        dropout_rng_impl = default_dropout_rng_impl(sharded=shardings is not None)
    update = functools.partial(
        train_update, model=with_lora(model, lora_config), label_smoothing=label_smoothing,
        grad_accum_steps=grad_accum_steps, max_grad_norm=max_grad_norm, schedule=schedule,
        dropout_rng_impl=dropout_rng_impl,
    )
    if jit:
        return jit_train_update(update, shardings)

    def train_step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, dict]:
        return update(state, batch, rng)

    train_step.num_compilations = lambda: 0
    train_step.compile_stats = compile_events.CompileStats
    return train_step


def make_eval_step(model, lora_config: LoraConfig | None = None, *, jit: bool = True):
    """Returns `eval_step(params, batch) -> {"loss_sum", "tokens"}` (no dropout, no smoothing); the caller divides
    summed losses by summed tokens over the whole split. Rows with batch["example_mask"] 0 (padding rows) count 0."""
    apply_model = with_lora(model, lora_config)

    def eval_step(params, batch: Batch):
        logits = model_logits(apply_model, params, batch, None)
        losses, mask = token_losses(logits, batch["labels"])
        if "example_mask" in batch:
            row = batch["example_mask"].astype(jnp.float32)[:, None]
            losses, mask = losses * row, mask * row
        return {"loss_sum": losses.sum(), "tokens": mask.sum()}

    return jax.jit(eval_step) if jit else eval_step
