"""LoRA as pure parameter-tree transforms (see transform.py) and a forward pass that adds the adapters (apply.py)."""

from lora_jax.lora.apply import LoraModel, lora_interceptor, with_lora
from lora_jax.lora.config import LoraConfig, path_matches
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
