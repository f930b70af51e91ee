"""Merged export: fold the adapters into the base and write a plain Hugging Face checkpoint (no lora_jax needed)."""

from __future__ import annotations

from typing import Any, Mapping

from lora_jax.checkpoints.files import PEFT_FILES, refuse_mixed_directory
from lora_jax.checkpoints.hf import save_pretrained
from lora_jax.lora.config import LoraConfig
from lora_jax.lora.transform import merge_lora


def export_merged(
    directory: str,
    params: Mapping,
    lora_config: LoraConfig,
    model_config,
    *,
    tokenizer_dir: str | None = None,
    generation_config: Mapping[str, Any] | Any | None = None,
) -> str:
    """W + scale·AB for every adapter, then `model.safetensors` (PyTorch layout) + `flax_model.msgpack` +
    `config.json` (+ tokenizer files, generation_config.json from a dict or GenerationConfig) in `directory`; a
    directory holding a PEFT adapter is refused (FileExistsError), so no directory holds both."""
    refuse_mixed_directory(directory, "a merged model", PEFT_FILES, "a PEFT adapter")
    merged = merge_lora(params, lora_config)
    save_pretrained(directory, merged, model_config, tokenizer_dir=tokenizer_dir, generation_config=generation_config)
    return directory
