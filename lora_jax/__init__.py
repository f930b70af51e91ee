"""lora_jax: LoRA as pure JAX/Flax parameter-tree transforms, with a Flax BART and its training scripts.

Packages: `lora` (LoRA itself, model-agnostic), `models` (the Flax BART), `checkpoints` (everything on disk),
`training` (train state and step, resumable checkpoints), `generation` (greedy and beam search), `data` (input
pipeline), `quantization` (int8 / NF4 frozen kernels). Three shared modules sit at the top: `sharding` (meshes,
partition rules, many hosts), `tree` (parameter trees by path) and `ranges` (valid ranges of config numbers).
The names below are the public API; docs/architecture.md says what each package may import.
"""

__version__ = "0.1.0"

from lora_jax.checkpoints import (
    AdapterMismatchError,
    CheckpointMismatchError,
    export_merged,
    export_peft,
    import_peft,
    load_adapter,
    load_pretrained,
    load_tokenizer,
    params_from_torch_state_dict,
    params_to_torch_state_dict,
    save_adapter,
    save_pretrained,
)
from lora_jax.generation import GenerationConfig, generate, generate_padded, load_generation_config
from lora_jax.lora import (
    LoraConfig,
    LoraModel,
    MultiLoraModel,
    StackInfo,
    stack_adapters,
    unstack,
    adamw_factory,
    adapter_params,
    combine,
    count_params,
    init_lora,
    lora_optimizer,
    merge_lora,
    param_labels,
    split_trainable,
    unmerge_lora,
    with_lora,
)
from lora_jax.generation.serving import AdapterServer
from lora_jax.models.bart import BartForConditionalGeneration, init_params, shift_tokens_right
from lora_jax.models.config import BartConfig, bart_base_config
from lora_jax.models.tying import untie_embeddings
from lora_jax.quantization import QuantSpec, dequantize_tree, quantize_base
from lora_jax.training import (
    TrainState,
    create_train_state,
    learning_rate_schedule,
    make_eval_step,
    make_train_step,
    token_losses,
    train_update,
)
