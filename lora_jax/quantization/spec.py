"""Which leaves of a parameter tree are stored quantised, and the tree transforms: `quantize_base`, `dequantize_tree`.

`quantize_base(params, spec)` replaces every 2-D `kernel` leaf (the `nn.Dense` kernels; never biases or norms) by an
`Int8Kernel` or `NF4Kernel`, and with `QuantSpec(embeddings=True)` the token embeddings by an `Int8Embedding`, one
leaf at a time, so no second full-precision copy of the tree is made beyond the one passed in. `quantize_leaf(path, value, spec)` is the same decision for one leaf, for loaders that
convert a checkpoint as they read it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from lora_jax.quantization.int8 import Int8Embedding, Int8Kernel, quantize_int8, quantize_int8_rows
from lora_jax.quantization.nf4 import NF4Kernel, quantize_nf4
from lora_jax.tree import Path, flatten_tree, path_str, unflatten_tree

QUANTIZERS = {"int8": quantize_int8, "nf4": quantize_nf4}
QuantizedKernel = Int8Kernel | NF4Kernel | Int8Embedding
TOKEN_EMBEDDINGS = ("shared", "embed_tokens")  # modules whose `embedding` is a token table (a tied head's kernel)
# The untied output head stays in its float dtype, as transformers' bitsandbytes integration keeps `lm_head` (QLoRA
# quantises the transformer's layers, not the head whose logits every token's loss reads; our `lm_head` is a plain
# nn.Dense).
NEVER_QUANTIZED: tuple[Path, ...] = (("lm_head",),)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """method: "int8" (per-output-channel absmax) or "nf4" (QLoRA's 4-bit NormalFloat, blocks of 64, double-quantised
    scales). exclude: module paths (or regexes, matched against the '/'-joined path or a suffix of it at a '/')
    whose kernels stay unquantised, e.g. modules trained in full. embeddings: also store the token embeddings
    (`shared` / `embed_tokens`, the tied LM head) as int8 with one scale per row (`Int8Embedding`), whatever
    `method` the kernels use; positions, biases and norms stay as they are."""

    method: str = "int8"
    exclude: tuple[str, ...] = ()
    embeddings: bool = False

    def __post_init__(self):
        if self.method not in QUANTIZERS:
            raise ValueError(f"quantisation method {self.method!r} is unknown; use one of {sorted(QUANTIZERS)}")
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def applies_to(self, path: Path, shape: tuple[int, ...]) -> bool:
        """True for a 2-D `kernel` leaf (or, with `embeddings`, a token table) whose module is not excluded (nor the
        output head, see NEVER_QUANTIZED)."""
        if (len(shape) != 2 or not (path[-1] == "kernel" or self.is_token_embedding(path))
                or path[:-1] in NEVER_QUANTIZED):
            return False
        module = path_str(path[:-1])
        return not any(re.fullmatch(rf"(?:.*/)?(?:{p})", module) for p in self.exclude)

    def is_token_embedding(self, path: Path) -> bool:
        return self.embeddings and len(path) >= 2 and path[-1] == "embedding" and path[-2] in TOKEN_EMBEDDINGS


def as_spec(spec: QuantSpec | str | None) -> QuantSpec | None:
    """A QuantSpec from a spec, a method name, or None."""
    return QuantSpec(spec) if isinstance(spec, str) else spec


def is_quantized(leaf: Any) -> bool:
    return isinstance(leaf, (Int8Kernel, NF4Kernel, Int8Embedding))


def quantize_leaf(path: Path, value: Any, spec: QuantSpec | None) -> Any:
    """`value` quantised when `spec` applies to (path, its shape), else `value` itself."""
    if spec is None or not spec.applies_to(path, tuple(value.shape)):
        return value
    return quantize_int8_rows(value) if spec.is_token_embedding(path) else QUANTIZERS[spec.method](value)


def quantize_base(params: Mapping, spec: QuantSpec | str) -> dict:
    """params with every 2-D Dense kernel `spec` applies to stored quantised; other leaves are the same objects.
    Raises for a tree that already holds quantised kernels or LoRA adapters (quantise the base, then `init_lora`)."""
    spec = as_spec(spec)
    flat = flatten_tree(params)
    if any(is_quantized(v) for v in flat.values()):
        raise ValueError("params are already quantised; quantize_base takes a float tree (dequantize_tree undoes it)")
    if any(p[-1] in ("lora_a", "lora_b") for p in flat):
        raise ValueError("params hold LoRA adapters: quantise the base first, then add adapters with init_lora")
    for path in list(flat):
        flat[path] = quantize_leaf(path, flat[path], spec)  # one kernel at a time: its float copy can be freed next
    return unflatten_tree(flat)


def dequantize(leaf: Any, dtype: Any = None) -> Any:
    """A quantised kernel as a plain array (in `dtype`, default the dtype it had before quantisation); other leaves
    unchanged (cast to `dtype` when given)."""
    if is_quantized(leaf):
        return leaf.dequantize(jnp.dtype(leaf.dtype) if dtype is None else dtype)
    return leaf if dtype is None else jnp.asarray(leaf, dtype)


def dequantize_tree(params: Mapping) -> dict:
    """The plain tree: every quantised kernel dequantised to the dtype it had before quantisation."""
    return unflatten_tree({p: dequantize(v) for p, v in flatten_tree(params).items()})


def storage_bytes(params: Mapping) -> int:
    """Bytes the tree's leaves hold as stored (quantised kernels at their packed size)."""
    leaves = jax.tree_util.tree_leaves(params)
    return int(sum(x.nbytes for x in leaves))
