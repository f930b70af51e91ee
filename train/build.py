"""Everything a run is built from, before any step: model and params (loaded, sharded, adapted), tokenizer, tokenized
splits, generation settings and the optimizer."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

import lora_jax
from lora_jax import sharding
from lora_jax.data import load_splits, tokenize
from lora_jax.generation import GenerationConfig
from lora_jax.generation.config import model_generation_config
from lora_jax.lora import LoraConfig, LoraModel
from lora_jax.checkpoints.peft import load_any_adapter
from lora_jax.lora.residual_init import initial_adapter
from lora_jax.models.attention import check_attention_backend
from lora_jax.models.bart import BartForConditionalGeneration, init_params
from lora_jax.models.config import BartConfig
from lora_jax.quantization import QuantSpec, quantize_base
from train.config import RunConfig, generation_overrides, to_lora_config
from train.guard import guard_optimizer

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase


@dataclasses.dataclass(frozen=True)
class Run:
    """Model, params, tokenizer, tokenized splits and settings of a run (built once by `build`, never changed)."""

    cfg: RunConfig
    model: BartForConditionalGeneration
    params: dict  # the base, with adapters when training LoRA or when an adapter was loaded
    tokenizer: PreTrainedTokenizerBase
    splits: dict[str, datasets.Dataset]  # "train" / "eval" / "test", tokenized
    dropped: dict[str, int]  # rows dropped per split as empty
    lora_config: LoraConfig | None  # None: full fine-tuning
    mesh: Mesh
    gen: GenerationConfig  # beam-search settings of ROUGE evaluation
    pad_id: int
    start_id: int  # decoder start token
    # PiSSA / OLoRA: the adapters as initialised (A0, B0) and the untouched base, to save a LoRA of that base
    initial_adapter: dict | None = None
    original_params: dict | None = None

    @property
    def apply_model(self) -> BartForConditionalGeneration | LoraModel:
        """The model with the run's adapters in its forward pass (the model itself in full fine-tuning)."""
        return lora_jax.with_lora(self.model, self.lora_config)


def _dtype(name: str | None):
    return {None: None, "bfloat16": jnp.bfloat16, "float32": jnp.float32}[name]


def quant_spec(cfg: RunConfig) -> QuantSpec | None:
    """model.quantize as a QuantSpec; modules trained in full (lora.modules_to_save) stay unquantised."""
    if cfg.model.quantize is None:
        return None
    return QuantSpec(cfg.model.quantize, exclude=tuple(cfg.lora.modules_to_save))


def load_model(cfg: RunConfig, mesh: Mesh) -> tuple[BartForConditionalGeneration, dict]:
    """(model, params) from the checkpoint, sharded onto the mesh, or randomly initialised from model.init_config;
    weights stored in model.param_dtype (default model.dtype) or quantised (model.quantize), converted leaf by leaf."""
    dtype, spec = _dtype(cfg.model.dtype), quant_spec(cfg)
    param_dtype = _dtype(cfg.model.param_dtype) or dtype
    if cfg.model.checkpoint is not None:
        return lora_jax.load_pretrained(cfg.model.checkpoint, dtype=dtype, param_dtype=param_dtype, quantize=spec,
                                        mesh=mesh if mesh.size > 1 else None)
    config = BartConfig.from_dict(cfg.model.init_config)
    model = BartForConditionalGeneration(config, dtype=dtype, param_dtype=param_dtype)
    params = init_params(model, jax.random.PRNGKey(cfg.train.seed))
    return model, params if spec is None else quantize_base(params, spec)


def generation_settings(cfg: RunConfig, model) -> GenerationConfig:
    """The model's generation defaults (the checkpoint's, kept by load_pretrained; else its config's) with the
    run's eval section on top (its fields left null inherit)."""
    return model_generation_config(model).replace(**generation_overrides(cfg))


def fit_to_model(cfg: RunConfig, config: BartConfig) -> RunConfig:
    """`cfg` checked against the model, before any data or training work: a sequence length beyond its learned
    positions is refused when set (every batch would fail at evaluation) and, left at its default, lowered to the
    model's limit with a note; cuDNN attention without a GPU is refused."""
    limit, data = config.max_position_embeddings, cfg.data
    defaults = {f.name: f.default for f in dataclasses.fields(data)}
    for name in ("max_source_length", "max_target_length"):
        value = getattr(data, name)
        if value <= limit:
            continue
        if value != defaults[name]:
            raise ValueError(f"data.{name}={value} exceeds the model's max_position_embeddings ({limit}): the model has "
                             f"no positions beyond it; set data.{name} <= {limit}")
        logging.getLogger("train").info("data.%s: the default %d exceeds the model's max_position_embeddings; using %d",
                                        name, value, limit)
        data = dataclasses.replace(data, **{name: limit})
    check_attention_backend(cfg.model.attention, "model.attention")
    return dataclasses.replace(cfg, data=data)


def build(cfg: RunConfig, for_training: bool = True, adapter_dir: str | None = None) -> Run:
    """Loads model, tokenizer and data, and applies the LoRA config (fresh adapters, or `adapter_dir`'s)."""
    mesh = sharding.make_mesh(cfg.mesh)
    if for_training and cfg.train.batch_size % mesh.size:
        # every device takes an equal share of the batch axis; checked before the weights load
        raise ValueError(f"train.batch_size={cfg.train.batch_size} does not divide over the mesh's {mesh.size} devices "
                         f"(data x fsdp): set train.batch_size to a multiple of {mesh.size}")
    model, params = load_model(cfg, mesh)
    cfg = fit_to_model(cfg, model.config)
    # rematerialisation, scanned layers, attention path: how the model computes; parameters unchanged
    model = model.clone(remat=cfg.model.remat, scan_layers=cfg.model.scan_layers, attention=cfg.model.attention)
    tokenizer = lora_jax.load_tokenizer(cfg.model.tokenizer or cfg.model.checkpoint)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size}")
    splits, dropped = {}, {}
    for name, ds in load_splits(cfg.data).items():
        splits[name], dropped[name] = tokenize(ds, tokenizer, cfg.data, seed=cfg.train.seed, num_proc=cfg.data.num_proc)
    if for_training and "train" not in splits:
        raise ValueError("no training data: set data.train_files or data.dataset")
    lora_config = to_lora_config(cfg)
    if adapter_dir is not None:
        adapter, lora_config = load_any_adapter(adapter_dir, params, cfg.model.checkpoint)  # lora_jax or PEFT
        params = lora_jax.combine(params, adapter)
    original, initial = None, None
    if adapter_dir is None and lora_config is not None and for_training:
        original = params if lora_config.residual_init else None  # only the adapted kernels are not shared with it
        params = lora_jax.init_lora(params, lora_config, jax.random.PRNGKey(cfg.train.seed + 1), _dtype(cfg.lora.dtype))
        initial = initial_adapter(params) if lora_config.residual_init else None
    gen = generation_settings(cfg, model)
    return Run(cfg, model, params, tokenizer, splits, dropped, lora_config, mesh, gen,
               model.config.pad_token_id, model.config.decoder_start_token_id, initial, original)


def make_optimizer(cfg: RunConfig, lora_config: LoraConfig | None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(AdamW over the trainable leaves, skipping non-finite steps (train.guard); its learning-rate schedule) from the
    optim section."""
    o = cfg.optim
    schedule = lora_jax.learning_rate_schedule(o.learning_rate, cfg.train.num_steps, o.warmup_steps, o.schedule)
    make_tx = lora_jax.adamw_factory(o.weight_decay, o.b1, o.b2, o.eps)
    tx = lora_jax.lora_optimizer(make_tx, lora_config, learning_rate=schedule, loraplus_lr_ratio=cfg.lora.loraplus_lr_ratio,
                                 full_finetune=lora_config is None)
    return guard_optimizer(tx), schedule
