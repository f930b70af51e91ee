"""A stack of identical layers named '0', '1', ... (the transformers parameter layout), run unrolled or scanned.

Unrolled, XLA compiles every layer's fusions separately: the bart-base train step's compilation grows with the
layer count (46 s on the 2-core benchmark CPU). With `scan=True` the stack runs as one `jax.lax.scan` over the
layers' parameters, stacked inside the traced function, so one layer body is traced and compiled per stack.
The parameter tree is unchanged (`layers/0/...`, `layers/1/...`): loading, saving, adapters, PEFT files and
sharding rules never see the stacked form, which exists only inside the computation (a per-call copy of the
layers' weights, the price of compiling one body).

The scan needs every layer's parameters to have one structure and dtypes; adapters whose rank differs from layer to
layer (a rank_pattern) are zero-padded to the largest rank inside the scan (exact: the padding adds zeros and gets
zero gradients). Other read-only collections beside `params` (LoraModel's per-module scales, `lora_scales`) are
stacked the same way and carried by the scan as data. Layers that differ in structure (LoRA on some layers only)
run unrolled, and so does every stack at init.

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

from lora_jax.dropout import DROPOUT_MASK
from lora_jax.models.config import BartConfig
from lora_jax.tree import merge_trees

# Rematerialisation policies by name: what a layer keeps for the backward pass; the rest is recomputed there.
_SAVE_MASKS = jax.checkpoint_policies.save_only_these_names(DROPOUT_MASK)
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input: least memory, +1 forward
    # keep matmul outputs and dropout masks (1 byte per element; drawing them again cost more than keeping them),
    # recompute softmax/GELU/LayerNorm
    "dots": jax.checkpoint_policies.save_from_both_policies(jax.checkpoint_policies.dots_saveable, _SAVE_MASKS),
    # also recompute attention matmuls
    "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _SAVE_MASKS),
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
# Leaves whose rank axis a scan may zero-pad: LoRA's lora_a (in, r) and lora_b (r, out) (lora_jax.lora.leaves; named
# here because models sit below lora and do not import it).
LORA_A, LORA_B = "lora_a", "lora_b"
NOT_CARRIED = ("cache", "intermediates")  # mutable collections: a scan body neither reads nor writes them


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


def _rank_free_shape(path: tuple, x: Any) -> tuple:
    """x's shape with an adapter's rank axis (lora_a's last, lora_b's first) left out: layers whose adapters differ
    only in rank can still be scanned, padded to the largest."""
    axis, shape = _rank_axis(path), tuple(x.shape)
    return shape if axis is None else shape[:-1] if axis == -1 else shape[1:]


def _scan_signature(tree: Any) -> tuple:
    leaves, structure = jax.tree_util.tree_flatten_with_path(tree)
    return structure, tuple((_rank_free_shape(p, x), x.dtype) for p, x in leaves)


def _rank_axis(path: tuple) -> int | None:
    name = getattr(path[-1], "key", None)
    return -1 if name == LORA_A else 0 if name == LORA_B else None


def _pad_ranks(trees: list) -> list:
    """Per-layer trees of one `_scan_signature` with every lora_a (in, r_i) / lora_b (r_i, out) zero-padded to the
    largest r: (x @ [A, 0]) @ [B; 0] = (x @ A) @ B, and the padding's gradients are zero."""
    def rank(path, *xs):
        axis = _rank_axis(path)
        return 0 if axis is None else max(x.shape[axis] for x in xs)

    ranks = jax.tree_util.tree_map_with_path(rank, trees[0], *trees[1:])

    def pad(path, x, r):
        axis = _rank_axis(path)
        if axis is None or x.shape[axis] == r:
            return x
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, r - x.shape[axis])
        return jnp.pad(x, widths)

    return [jax.tree_util.tree_map_with_path(pad, t, ranks) for t in trees]


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
        if STACKED in self.variables.get("params", {}):
            return self._unrolled_from_stacked(hidden, args, deterministic)
        for layer in self.layers:
            hidden = _hidden_of(layer(hidden, *args, deterministic))  # positional: a static argument under remat
        return hidden

    def _collections(self) -> dict:
        """The read-only collections a layer reads ({"params": ..., and e.g. LoraModel's "lora_scales"})."""
        return {k: v for k, v in self.variables.items() if k not in NOT_CARRIED and v}

    def _per_layer(self, collection: Any) -> list:
        return [collection.get(str(i)) for i in range(self.num_layers)]

    def scannable(self) -> bool:
        """True when `scan` is set and every layer's parameters share structure and dtypes (shapes too, but for the
        adapters' rank, which is padded); pre-stacked layers are scanned whenever the layers beside them allow it."""
        if self.is_initializing():
            return False
        params = self.variables.get("params", {})
        if STACKED in params and not self.scan:
            raise ValueError("these params hold pre-stacked layers (`stack_layers`), which only a scanned layer "
                             "stack reads: build the model with scan_layers=True, or pass unstack_layers(params)")
        if not self.scan or self.num_layers < 2:
            return False
        for collection in self._collections().values():
            layers = self._per_layer(collection)
            if STACKED in collection and all(p is None for p in layers):
                continue
            if any(p is None for p in layers) or len({_scan_signature(p) for p in layers}) != 1:
                return False
        return True

    def stacked_collection(self, collection: Any) -> Any:
        """Every layer's leaves of one collection with a leading layer axis: pre-stacked leaves (`stack_layers`) as
        they are, merged with the per-layer leaves stacked here (adapters zero-padded to one rank)."""
        per_layer = self._per_layer(collection)
        if STACKED in collection and all(p is None for p in per_layer):
            return collection[STACKED]
        stacked = _stack_trees(_pad_ranks(per_layer))
        return merge_trees(collection[STACKED], stacked) if STACKED in collection else stacked

    def stacked_params(self) -> Any:
        return self.stacked_collection(self.variables["params"])

    def _unbound_layer(self) -> nn.Module:
        # One unbound layer applied functionally to each layer's slice; parent=None keeps it out of this module's
        # tree. Interceptors (LoraModel's) see its Dense calls as usual.
        return self.layer_class()(self.config, self.dtype, self.param_dtype, self.attention, parent=None)

    def _dropout_keys(self) -> jax.Array | None:
        return jax.random.split(self.make_rng("dropout"), self.num_layers) if self.has_rng("dropout") else None

    def _scan(self, hidden: jax.Array, args: tuple, deterministic: bool) -> jax.Array:
        stacked = {k: self.stacked_collection(v) for k, v in self._collections().items()}
        layer = self._unbound_layer()

        def body(h, xs):
            variables, key = xs
            rngs = None if key is None else {"dropout": key}
            return _hidden_of(layer.apply(variables, h, *args, deterministic, rngs=rngs)), None

        hidden, _ = jax.lax.scan(body, hidden, (stacked, self._dropout_keys()))
        return hidden

    def _unrolled_from_stacked(self, hidden: jax.Array, args: tuple, deterministic: bool) -> jax.Array:
        """Pre-stacked weights beside per-layer leaves that differ from layer to layer (e.g. LoRA on some layers
        only): each layer runs on its slice of the stacked leaves merged with its own leaves."""
        layer, keys = self._unbound_layer(), self._dropout_keys()
        for i in range(self.num_layers):
            variables = {}
            for name, collection in self._collections().items():
                own = collection.get(str(i), {})
                if STACKED in collection:
                    own = merge_trees(jax.tree_util.tree_map(lambda x: x[i], collection[STACKED]), own)
                variables[name] = own
            rngs = None if keys is None else {"dropout": keys[i]}
            hidden = _hidden_of(layer.apply(variables, hidden, *args, deterministic, rngs=rngs))
        return hidden
