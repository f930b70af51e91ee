"""lora_jax: LoRA as pure JAX/Flax parameter-tree transforms, with a Flax BART and its training scripts."""

from lora_jax.checkpoints import (
    AdapterMismatchError,
    CheckpointMismatchError,
    load_pretrained,
    load_tokenizer,
    params_from_torch_state_dict,
    params_to_torch_state_dict,
    save_pretrained,
    export_merged,
    export_peft,
    import_peft,
    load_adapter,
    save_adapter,
)
from lora_jax.lora.config import LoraConfig
from lora_jax.models.bart import BartForConditionalGeneration, init_params, shift_tokens_right
from lora_jax.models.config import BartConfig, bart_base_config

__version__ = "0.1.0"
from lora_jax.lora import (
    LoraModel,
    adapter_params,
    combine,
    count_params,
    init_lora,
    merge_lora,
    split_trainable,
    unmerge_lora,
    with_lora,
)
from lora_jax.optim import adamw_factory, learning_rate_schedule, lora_optimizer, param_labels
from lora_jax.training import TrainState, create_train_state, make_eval_step, make_train_step, token_losses
