"""Tied and untied word embeddings of a BART parameter tree.

Tied (BART's default, `tie_word_embeddings=True`): one leaf, `model/shared/embedding (V, D)`, is the encoder's and the
decoder's token embedding and, transposed, the LM head. Untied: three more leaves, each its own weight,

    model/encoder/embed_tokens/embedding (V, D), model/decoder/embed_tokens/embedding (V, D), lm_head/kernel (D, V)

(`lm_head/kernel` is the transformers-4.x Flax name; `model/shared/embedding` stays, unused by the forward pass, so a
save/load round trip through transformers is exact). The model reads whichever of the three a tree holds, so a tied
tree plus one of them (a PEFT `modules_to_save` copy of `lm_head` or `embed_tokens`) computes what PEFT computes.
"""

from __future__ import annotations

from typing import Mapping

from lora_jax.tree import Path, flatten_tree, unflatten_tree

SHARED: Path = ("model", "shared", "embedding")
ENCODER_EMBED: Path = ("model", "encoder", "embed_tokens", "embedding")
DECODER_EMBED: Path = ("model", "decoder", "embed_tokens", "embedding")
LM_HEAD: Path = ("lm_head", "kernel")
UNTIED_LEAVES: tuple[Path, ...] = (ENCODER_EMBED, DECODER_EMBED, LM_HEAD)


def has_untied_leaves(params: Mapping) -> bool:
    """True when the tree holds a token embedding or head of its own (any of `UNTIED_LEAVES`)."""
    flat = flatten_tree(params)
    return any(path in flat for path in UNTIED_LEAVES)


def untie_embeddings(params: Mapping) -> dict:
    """The same model as an untied tree: each missing one of `UNTIED_LEAVES` becomes a copy of the shared embedding
    (the head as its transpose, (D, V)). Leaves already present are kept, so the outputs do not change."""
    flat = flatten_tree(params)
    if SHARED not in flat:
        raise ValueError(f"params have no {'/'.join(SHARED)}: not a BART parameter tree")
    shared = flat[SHARED]
    for path in UNTIED_LEAVES:
        if path not in flat:
            flat[path] = shared.T if path == LM_HEAD else shared
    return unflatten_tree(flat)
