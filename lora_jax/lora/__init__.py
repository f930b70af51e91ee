"""LoRA as pure parameter-tree transforms (transform.py), a forward pass that adds the adapters (apply.py) and
optimizers that update only what LoRA trains (optim.py). Nothing here knows BART, checkpoints or the train loop."""

from lora_jax.lora.apply import LoraModel, lora_interceptor, with_lora
from lora_jax.lora.config import LoraConfig, path_matches
from lora_jax.lora.optim import adamw_factory, lora_optimizer, param_labels, state_bytes
from lora_jax.lora.transform import (
    adapter_params,
    combine,
    count_params,
    init_lora,
    kernel_modules,
    merge_lora,
    split_trainable,
    target_modules,
    unmerge_lora,
)
