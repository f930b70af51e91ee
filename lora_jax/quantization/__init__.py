"""Frozen base weights stored small: int8 (per-output-channel absmax) and NF4 (QLoRA's 4-bit NormalFloat with
double-quantised block scales) kernels as pytree leaves, the tree transforms that make and undo them (`spec.py`), and
the `Dense` layer that computes with them (`dense.py`), and int8 token embeddings with the `Embed` layer whose tied
LM head multiplies them block by block (`embed.py`). Nothing here knows LoRA, BART or checkpoints."""

from lora_jax.quantization.dense import Dense, converted_matmul
from lora_jax.quantization.embed import Embed, int8_attend
from lora_jax.quantization.int8 import Int8Embedding, Int8Kernel, quantize_int8, quantize_int8_rows
from lora_jax.quantization.nf4 import NF4_CODE, NF4Kernel, quantize_nf4
from lora_jax.quantization.spec import (
    QuantSpec,
    as_spec,
    dequantize,
    dequantize_tree,
    is_quantized,
    quantize_base,
    quantize_leaf,
    storage_bytes,
)
