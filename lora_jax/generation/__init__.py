"""Greedy and beam-search generation for encoder-decoder models, jitted, with a key/value cache.

api.py         generate, generate_padded, resolve_config (the public functions)
search.py      the decoding loops (greedy, beam search) and their jitted form
processors.py  logits processors (no-repeat n-gram, min length, forced BOS / EOS)
config.py      GenerationConfig, read from a checkpoint or a model config
serving.py     AdapterServer: one base, one compiled mixed-adapter search, adapters hot-swapped by value
"""

from lora_jax.generation.api import generate, generate_padded, resolve_config, trim
from lora_jax.generation.config import GenerationConfig, config_from_model, load_generation_config
from lora_jax.generation.processors import process_scores
from lora_jax.generation.search import num_compilations

__all__ = [
    "GenerationConfig",
    "config_from_model",
    "generate",
    "generate_padded",
    "load_generation_config",
    "num_compilations",
    "process_scores",
    "resolve_config",
    "trim",
]
