"""Greedy search, sampling, beam search, beam sampling and group (diverse) beam search for encoder-decoder models,
jitted, with a key/value cache.

api.py         generate, generate_padded, resolve_config (the public functions)
search.py      the decoding loops (greedy / sampling, beam search) and their jitted form
group_search.py  group (diverse) beam search: num_beam_groups, diversity_penalty (transformers 4.55's)
decoder_steps.py the steps the loops share: encode once, one cached decoder step, beam gathers, length penalties
processors.py  transformers' logits processors, in its order
warpers.py     transformers' sampling warpers (temperature, top-k, top-p, min-p, typical-p)
config.py      GenerationConfig, read from a checkpoint (as transformers reads it) or a model config
settings.py    which transformers settings are honoured, ignored (no effect on the ids) or refused
serving.py     AdapterServer: one base, one compiled mixed-adapter search, adapters hot-swapped by value
"""

from lora_jax.generation.api import generate, generate_padded, resolve_config, trim
from lora_jax.generation.config import (
    GenerationConfig,
    config_from_model,
    load_generation_config,
    model_generation_config,
)
from lora_jax.generation.processors import process_scores
from lora_jax.generation.search import num_compilations

__all__ = [
    "GenerationConfig",
    "config_from_model",
    "generate",
    "generate_padded",
    "load_generation_config",
    "model_generation_config",
    "num_compilations",
    "process_scores",
    "resolve_config",
    "trim",
]
