"""Training: the train state and step (step.py), resumable checkpoints (checkpoint.py), learning-rate schedules
(schedules.py), process settings for CPU runs (runtime.py) and compile counts from jax.monitoring
(compile_events.py)."""

from lora_jax.training.checkpoint import TrainCheckpointer
from lora_jax.training.schedules import learning_rate_schedule
from lora_jax.training.step import (
    PREFERRED_DROPOUT_RNG,
    TrainState,
    accumulate_gradients,
    create_train_state,
    default_dropout_rng_impl,
    jit_train_update,
    make_eval_step,
    make_train_step,
    model_logits,
    token_losses,
    train_update,
)
