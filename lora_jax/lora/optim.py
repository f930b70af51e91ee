"""Optimizers that update only what LoRA trains: an `optax.multi_transform` over labels derived from leaf paths.

Labels: "trainable" (adapters, modules_to_save; every leaf in full fine-tuning), "lora_b" (B matrices, only with LoRA+)
and "frozen" (everything else, sent to `optax.set_to_zero()`, which keeps no state). Labels are computed from paths,
so the same optimizer works on the whole params tree or on just its trainable part.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import optax

from lora_jax.lora.config import LoraConfig
from lora_jax.lora.transform import LORA_B, is_trainable
from lora_jax.tree import flatten_tree, tree_bytes, unflatten_tree

TRAINABLE, FROZEN, LORA_B_LABEL = "trainable", "frozen", "lora_b"
TxFactory = Callable[[optax.ScalarOrSchedule], optax.GradientTransformation]


def param_labels(params: Mapping, config: LoraConfig | None, *, full_finetune: bool = False, loraplus: bool = False) -> dict:
    """A tree like `params` of "trainable" / "lora_b" / "frozen" labels."""
    flat = flatten_tree(params)

    def label(path):
        if loraplus and path[-1] == LORA_B:
            return LORA_B_LABEL
        return TRAINABLE if is_trainable(path, config, full_finetune) else FROZEN

    return unflatten_tree({p: label(p) for p in flat})


def _scaled(learning_rate: optax.ScalarOrSchedule, ratio: float) -> optax.ScalarOrSchedule:
    if callable(learning_rate):
        return lambda step: ratio * learning_rate(step)
    return ratio * learning_rate


def lora_optimizer(
    tx: optax.GradientTransformation | TxFactory,
    config: LoraConfig | None,
    *,
    learning_rate: optax.ScalarOrSchedule | None = None,
    loraplus_lr_ratio: float | None = None,
    full_finetune: bool = False,
) -> optax.GradientTransformation:
    """`tx` for trainable leaves, `set_to_zero()` for frozen ones; optimizer state exists only for trainable leaves.

    tx: a GradientTransformation, or a factory `make_tx(learning_rate) -> GradientTransformation` (needed for LoRA+,
      which builds a second copy for the B matrices with learning_rate * loraplus_lr_ratio).
    config: the LoraConfig (None with full_finetune=True).
    """
    if config is None and not full_finetune:
        raise ValueError("lora_optimizer needs a LoraConfig, or full_finetune=True to train every leaf")
    loraplus = loraplus_lr_ratio is not None and not full_finetune
    if isinstance(tx, optax.GradientTransformation):
        if loraplus:
            raise ValueError("LoRA+ needs a factory make_tx(learning_rate) and learning_rate, not a built optimizer")
        main = tx
    else:
        if learning_rate is None:
            raise ValueError("pass learning_rate= together with an optimizer factory")
        main = tx(learning_rate)
    transforms = {TRAINABLE: main, FROZEN: optax.set_to_zero()}
    if loraplus:
        transforms[LORA_B_LABEL] = tx(_scaled(learning_rate, loraplus_lr_ratio))
    labels = lambda tree: param_labels(tree, config, full_finetune=full_finetune, loraplus=loraplus)
    return optax.multi_transform(transforms, labels)


def adamw_factory(weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> TxFactory:
    """make_tx(learning_rate) -> AdamW with these settings (for `lora_optimizer`)."""
    return lambda lr: optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)


def state_bytes(opt_state) -> int:
    """Bytes held by an optimizer state's arrays."""
    return tree_bytes(opt_state)
