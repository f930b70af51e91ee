"""LoRA as pure parameter-tree transforms (transform.py), a forward pass that adds the adapters (apply.py) and
optimizers that update only what LoRA trains (optim.py); many adapters in one batch: K adapters as one stacked tree
(stack.py) and a forward pass where each example picks its own (multi.py); adapter algebra (algebra.py); the
paper's Section 7 analysis of trained adapters (analysis.py). Nothing here knows BART, checkpoints or the train loop."""

from lora_jax.lora.apply import LoraModel, lora_interceptor, with_lora
from lora_jax.lora import algebra
from lora_jax.lora.config import LoraConfig, path_matches
from lora_jax.lora.multi import MultiLoraModel
from lora_jax.lora.stack import StackInfo, remove_adapter, replace_adapter, stack_adapters, unstack
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
