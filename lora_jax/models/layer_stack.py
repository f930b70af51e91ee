"""A stack of identical layers named '0', '1', ... (the transformers parameter layout), run unrolled or scanned.

Unrolled, XLA compiles every layer's fusions separately: the bart-base train step's compilation grows with the
layer count (46 s on the 2-core benchmark CPU). With `scan=True` the stack runs as one `jax.lax.scan` over the
layers' parameters, stacked inside the traced function, so one layer body is traced and compiled per stack.
The parameter tree is unchanged (`layers/0/...`, `layers/1/...`): loading, saving, adapters, PEFT files and
sharding rules never see the stacked form, which exists only inside the computation (a per-call copy of the
layers' weights, the price of compiling one body).

The scan needs every layer's parameters to have one structure, shapes and dtypes (LoRA on some layers only, or a
per-layer rank, breaks that): otherwise, and at init, the stack runs unrolled.

The per-call copy is avoidable where the same weights are used for many calls: `stack_layers(tree)` moves each layer
stack's leaves to `layers/stacked/...` with a leading layer axis, once, and a scanned stack reads them in place
(merged with whatever per-layer leaves remain, e.g. the adapters being trained, which are small). A training run
keeps its frozen weights this way (`create_train_state(..., stack_layers=True)`); `unstack_layers` gives back the
transformers layout for everything else (saving, generation with a cache, merging).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from lora_jax.models.config import BartConfig
from lora_jax.tree import merge_trees

# Rematerialisation policies by name: what a layer keeps for the backward pass; the rest is recomputed there.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input: least memory, +1 forward
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute softmax/GELU/LayerNorm/dropout
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # also recompute attention matmuls
}
# Index of `deterministic` in each layer's __call__, counting self (it must be static under remat).
DETERMINISTIC_ARG = {"BartEncoderLayer": 3, "BartDecoderLayer": 6}


def remat_policy(name: str | None):
    if name is None:
        return None
    try:
        return REMAT_POLICIES[name]
    except KeyError:
        raise ValueError(f"remat={name!r} is not a policy; use None or one of {sorted(REMAT_POLICIES)}") from None


STACKED = "stacked"  # a layer stack's key for leaves pre-stacked by `stack_layers` (leading axis: the layer)


def _layer_keys(node: Any) -> list[str] | None:
    """['0', ..., 'n-1'] when `node` is a dict keyed exactly by n >= 2 layer indices, else None."""
    if not isinstance(node, dict) or len(node) < 2:
        return None
    keys = [str(i) for i in range(len(node))]
    return keys if set(node) == set(keys) else None


def stack_layers(tree: Any) -> Any:
    """`tree` with every `layers` dict of n >= 2 identically shaped layers '0'..'n-1' replaced by {STACKED: their
    leaves stacked on a new leading axis (n, ...)}. Other subtrees are returned as they are (not copied); a `layers`
    dict whose layers differ in structure, shape or dtype is left per-layer. Inverse: `unstack_layers`."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, node in tree.items():
        keys = _layer_keys(node) if key == "layers" else None
        if keys and len({_signature(node[k]) for k in keys}) == 1:
            out[key] = {STACKED: _stack_trees(node[k] for k in keys)}
        else:
            out[key] = stack_layers(node)
    return out


def unstack_layers(tree: Any) -> Any:
    """The transformers layout again: every {STACKED: leaves (n, ...)} becomes layers '0'..'n-1' (merged with any
    per-layer leaves beside it)."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, node in tree.items():
        if isinstance(node, dict) and STACKED in node:
            stacked = node[STACKED]
            n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
            rest = {k: unstack_layers(v) for k, v in node.items() if k != STACKED}
            layers = {str(i): jax.tree_util.tree_map(lambda x, i=i: x[i], stacked) for i in range(n)}
            out[key] = {k: merge_trees(layers.get(k, {}), rest.get(k, {}))
                        for k in sorted(set(layers) | set(rest), key=int)}
        else:
            out[key] = unstack_layers(node)
    return out


def _stack_trees(trees: Any) -> Any:
    """Identically structured trees -> one tree whose leaves are theirs stacked on a new leading axis."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def _hidden_of(output: Any) -> jax.Array:
    # Encoder layers return hidden (B, T, D); decoder layers (hidden, cache).
    return output[0] if isinstance(output, tuple) else output


def _signature(tree: Any) -> tuple:
    leaves, structure = jax.tree_util.tree_flatten(tree)
    return structure, tuple((x.shape, x.dtype) for x in leaves)


class LayerStack(nn.Module):
    """Holds layers named '0', '1', ... so the tree reads `layers/0/...` as in transformers. With `remat` set, each
    layer is wrapped in `nn.remat` (same parameter names), so its activations are recomputed in the backward pass.
    With `scan` set, cache-free calls (training, evaluation, encoding) run the layers as one `lax.scan`."""

    config: BartConfig
    layer_cls: Any
    num_layers: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str | None = None
    scan: bool = False
    attention: str | None = None

    def layer_class(self) -> Any:
        """The layer class, wrapped in `nn.remat` when `remat` is set."""
        if self.remat is None:
            return self.layer_cls
        static = (DETERMINISTIC_ARG[self.layer_cls.__name__],)
        return nn.remat(self.layer_cls, static_argnums=static, policy=remat_policy(self.remat))

    def setup(self):
        cls = self.layer_class()
        self.layers = [cls(self.config, self.dtype, self.param_dtype, self.attention, name=str(i)) for i in range(self.num_layers)]

    def __call__(self, hidden: jax.Array, args: tuple, deterministic: bool) -> jax.Array:
        """hidden (B, T, D) through every layer, `layer(hidden, *args, deterministic)`, without a decoding cache."""
        if self.scannable():
            return self._scan(hidden, args, deterministic)
        for layer in self.layers:
            hidden = _hidden_of(layer(hidden, *args, deterministic))  # positional: a static argument under remat
        return hidden

    def scannable(self) -> bool:
        """True when `scan` is set and every layer's parameters share structure, shapes and dtypes."""
        if self.is_initializing():
            return False
        params = self.variables.get("params", {})
        if STACKED in params:  # pre-stacked weights can only be scanned
            if not self.scan:
                raise ValueError("these params hold pre-stacked layers (`stack_layers`), which only a scanned layer "
                                 "stack reads: build the model with scan_layers=True, or pass unstack_layers(params)")
            return True
        if not self.scan or self.num_layers < 2:
            return False
        layers = [params.get(str(i)) for i in range(self.num_layers)]
        if any(p is None for p in layers):
            return False
        first = _signature(layers[0])
        return all(_signature(p) == first for p in layers[1:])

    def stacked_params(self) -> Any:
        """Every layer's parameters with a leading layer axis: pre-stacked leaves (`stack_layers`) as they are, merged
        with the per-layer leaves stacked here (all of them when nothing was pre-stacked)."""
        params = self.variables["params"]
        per_layer = [params.get(str(i)) for i in range(self.num_layers)]
        if STACKED in params and all(p is None for p in per_layer):
            return params[STACKED]
        if any(p is None for p in per_layer) or len({_signature(p) for p in per_layer}) != 1:
            raise ValueError(f"pre-stacked layers need the same per-layer leaves on each of the {self.num_layers} "
                             "layers (e.g. adapters on every layer, one rank): unstack_layers(params) runs unrolled")
        stacked = _stack_trees(per_layer)
        return merge_trees(params[STACKED], stacked) if STACKED in params else stacked

    def _scan(self, hidden: jax.Array, args: tuple, deterministic: bool) -> jax.Array:
        stacked = self.stacked_params()
        # One unbound layer applied functionally to each layer's slice; parent=None keeps it out of this module's
        # tree. Interceptors (LoraModel's) see its Dense calls as usual.
        layer = self.layer_class()(self.config, self.dtype, self.param_dtype, self.attention, parent=None)
        keys = jax.random.split(self.make_rng("dropout"), self.num_layers) if self.has_rng("dropout") else None

        def body(h, xs):
            layer_params, key = xs
            rngs = None if key is None else {"dropout": key}
            return _hidden_of(layer.apply({"params": layer_params}, h, *args, deterministic, rngs=rngs)), None

        hidden, _ = jax.lax.scan(body, hidden, (stacked, keys))
        return hidden
