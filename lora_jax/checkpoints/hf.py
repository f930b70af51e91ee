"""Reading and writing Hugging Face BART checkpoints as our Flax parameter tree.

Supported inputs: a local checkpoint directory or a hub id, holding `flax_model.msgpack`, `model.safetensors`
(also sharded, with `model.safetensors.index.json`) or `pytorch_model.bin` (only when torch is installed).
PyTorch layout -> Flax layout: Linear `weight` (out, in) -> `kernel` (in, out); LayerNorm `weight` -> `scale`;
Embedding `weight` -> `embedding`. Writes go to a temporary file first and are renamed into place, so a crash never
leaves a half-written checkpoint file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from jax.sharding import Mesh

from lora_jax import sharding
from lora_jax.checkpoints.files import atomic_write
from lora_jax.checkpoints.safetensors_io import SAFE_INDEX, SAFE_WEIGHTS, LazySafetensors
from lora_jax.generation.config import GenerationConfig, load_generation_config
from lora_jax.lora.transform import ADAPTER_LEAVES
from lora_jax.models.bart import BartForConditionalGeneration, activation
from lora_jax.models.config import BartConfig
from lora_jax.models.tying import has_untied_leaves, untie_embeddings
from lora_jax.quantization import QuantSpec, as_spec, quantize_leaf
from lora_jax.tree import flatten_tree, unflatten_tree

FLAX_WEIGHTS = "flax_model.msgpack"
TORCH_WEIGHTS = "pytorch_model.bin"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
SHARED_KEY = "model.shared.weight"
# Real BART checkpoints may carry the tied embedding under any of these names as well (or instead).
TIED_EMBEDDING_KEYS = (SHARED_KEY, "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight")


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model built from its config (missing weights or other shapes)."""


def resolve(path_or_hub_id: str) -> str:
    """A local directory for `path_or_hub_id`, downloading from the hub when it is not a local path."""
    if os.path.isdir(path_or_hub_id):
        return path_or_hub_id
    if os.path.exists(path_or_hub_id) or path_or_hub_id.startswith((".", "/")):
        raise FileNotFoundError(f"{path_or_hub_id!r} is not a checkpoint directory")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "*.safetensors", FLAX_WEIGHTS, "*.model"]
    try:
        local = snapshot_download(path_or_hub_id, allow_patterns=patterns)
    except Exception as e:  # the hub raises many types; all mean "could not get it"
        raise OSError(
            f"{path_or_hub_id!r} is not a local directory, and downloading it from the Hugging Face hub failed "
            f"({type(e).__name__}: {str(e).splitlines()[0]}). Check the path, or without network pass a local "
            "checkpoint directory (config.json + model.safetensors or flax_model.msgpack)."
        ) from e
    if not any(os.path.exists(os.path.join(local, f)) for f in (SAFE_WEIGHTS, SAFE_INDEX, FLAX_WEIGHTS)):
        local = snapshot_download(path_or_hub_id, allow_patterns=patterns + [TORCH_WEIGHTS])
    return local


def expected_shapes(config: BartConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat {tree path: shape} of the parameters a model with `config` has (computed abstractly, no weights made)."""
    model = BartForConditionalGeneration(config)
    ids = jnp.ones((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, ids, ids)["params"])
    return {k: tuple(v.shape) for k, v in flatten_tree(shapes).items()}


def torch_key(path: tuple[str, ...]) -> str:
    """The PyTorch state-dict name of Flax leaf `path`."""
    if path == ("final_logits_bias",):
        return "final_logits_bias"
    *module, leaf = path
    return ".".join(module) + "." + {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)


def _to_flax(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    return array.T if path[-1] == "kernel" else array


def _read_safetensors(directory: str) -> Mapping[str, np.ndarray]:
    return LazySafetensors(directory)  # each tensor read when looked up


def _read_torch_bin(directory: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{directory} holds only {TORCH_WEIGHTS}, which needs torch to read. Install torch "
            "(pip install 'lora_jax[torch]') or convert the checkpoint to model.safetensors."
        ) from None
    state = torch.load(os.path.join(directory, TORCH_WEIGHTS), map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def _shape_error(problems: list[str], what: str) -> CheckpointMismatchError:
    shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
    return CheckpointMismatchError(
        f"{what} does not fit the model built from its config.json:\n  {shown}\n"
        "The checkpoint is probably for another base model: use the config.json that came with these weights."
    )


def _warn_ignored_tied_aliases(state: Mapping[str, Any], config: BartConfig) -> None:
    """Tied: the aliases of the shared embedding are the same weight (transformers ties them on load, ignoring their
    own values), so one that differs from it gets a warning: the checkpoint was probably saved untied. Reads only the
    embedding tensors (a lazy `state` stays lazy)."""
    aliases = [k for k in TIED_EMBEDDING_KEYS[1:] if k in state]
    shared_key = SHARED_KEY if SHARED_KEY in state else (aliases[0] if aliases else None)
    if not config.tie_word_embeddings or shared_key is None:
        return
    shared = np.asarray(state[shared_key])
    differing = [k for k in aliases if k != shared_key and np.shape(state[k]) == shared.shape
                 and not np.array_equal(np.asarray(state[k]), shared)]
    if differing:
        warnings.warn(
            f"config.json says tie_word_embeddings=true, so {differing} are ignored and {shared_key} is used in their "
            "place (as transformers does), but they hold other values: if the model was trained untied, set "
            "tie_word_embeddings: false in its config.json"
        )


LeafConverter = Callable[[tuple[str, ...], np.ndarray], Any]


def _state_key(state: Mapping[str, Any], path: tuple[str, ...]) -> str:
    """The state-dict name holding leaf `path`; the tied embedding may be under any of TIED_EMBEDDING_KEYS."""
    key = torch_key(path)
    if key == SHARED_KEY and key not in state:
        return next((k for k in TIED_EMBEDDING_KEYS[1:] if k in state), key)
    return key


def params_from_torch_state_dict(state: Mapping[str, np.ndarray], config: BartConfig,
                                 convert: LeafConverter | None = None) -> dict:
    """A PyTorch-layout BART state dict -> our nested Flax params (float32 numpy leaves, or `convert(path, leaf)`).

    Each tensor is looked up, transposed, checked and converted before the next is looked up, so with a lazy `state`
    (`LazySafetensors`) and a `convert` that makes the leaf smaller, the float32 model is never held whole.
    Raises CheckpointMismatchError naming every missing parameter and every shape that differs."""
    shapes = expected_shapes(config)
    _warn_ignored_tied_aliases(state, config)
    flat, problems = {}, []
    for path, shape in shapes.items():
        key = _state_key(state, path)
        if key not in state:
            problems.append(f"missing weight {key!r} (Flax {'/'.join(path)}, expected shape {shape})")
            continue
        value = _to_flax(path, np.asarray(state[key]))
        if path == ("final_logits_bias",) and value.ndim == 1:
            value = value[None]
        if tuple(value.shape) != shape:
            problems.append(f"{key}: checkpoint has shape {tuple(value.shape)} (as Flax {'/'.join(path)}), config expects {shape}")
            continue
        flat[path] = value if convert is None else convert(path, value)
    if problems:
        raise _shape_error(problems, "the checkpoint")
    used = {torch_key(p) for p in shapes} | (set(TIED_EMBEDDING_KEYS) if config.tie_word_embeddings else set())
    unused = sorted(k for k in state if k not in used and not k.endswith(".version"))
    if unused:
        warnings.warn(f"ignored {len(unused)} checkpoint weight(s) the model does not use: {unused[:10]}")
    return unflatten_tree(flat)


def params_to_torch_state_dict(params: Mapping) -> dict[str, np.ndarray]:
    """Our Flax params -> a PyTorch-layout state dict (float32 numpy), keys as `BartForConditionalGeneration` saves them
    (the tied embedding only once, as `model.shared.weight`)."""
    flat = flatten_tree(jax.device_get(params))
    out = {}
    for path, value in flat.items():
        if path[-1] in ADAPTER_LEAVES:
            raise ValueError("params still hold LoRA adapters: merge them first with lora_jax.merge_lora(params, config)")
        out[torch_key(path)] = np.ascontiguousarray(np.asarray(value, dtype=np.float32).T if path[-1] == "kernel" else np.asarray(value, np.float32))
    return out


def _check_flax_tree(params: Mapping, config: BartConfig) -> None:
    shapes = expected_shapes(config)
    flat = flatten_tree(params)
    problems = [f"missing weight {'/'.join(p)} (expected shape {s})" for p, s in shapes.items() if p not in flat]
    problems += [
        f"{'/'.join(p)}: checkpoint has shape {tuple(np.shape(flat[p]))}, config expects {s}"
        for p, s in shapes.items()
        if p in flat and tuple(np.shape(flat[p])) != s
    ]
    if problems:
        raise _shape_error(problems, FLAX_WEIGHTS)


def _read_flax(directory: str, config: BartConfig, convert: LeafConverter | None = None) -> dict:
    # msgpack has no index: the file is decoded whole. Each leaf is converted and its float32 original dropped before
    # the next, so the float32 copy shrinks as the converted tree grows.
    with open(os.path.join(directory, FLAX_WEIGHTS), "rb") as f:
        params = serialization.msgpack_restore(f.read())
    params = params.get("params", params)
    _check_flax_tree(params, config)
    if convert is None:
        return params
    flat = flatten_tree(params)
    del params
    return unflatten_tree({path: convert(path, flat.pop(path)) for path in list(flat)})


_READERS = {
    FLAX_WEIGHTS: _read_flax,
    SAFE_WEIGHTS: lambda d, c, convert=None: params_from_torch_state_dict(_read_safetensors(d), c, convert),
    TORCH_WEIGHTS: lambda d, c, convert=None: params_from_torch_state_dict(_read_torch_bin(d), c, convert),
}
_FILES = {FLAX_WEIGHTS: [FLAX_WEIGHTS], SAFE_WEIGHTS: [SAFE_WEIGHTS, SAFE_INDEX], TORCH_WEIGHTS: [TORCH_WEIGHTS]}


def read_params(directory: str, config: BartConfig, weights: str | None = None,
                convert: LeafConverter | None = None) -> dict:
    """Params from `directory` (numpy float32 leaves, or what `convert(path, leaf)` makes of each): from the `weights`
    file if given, else from the first of flax_model.msgpack, model.safetensors (or its sharded index),
    pytorch_model.bin that exists — model.safetensors first when `convert` is given, since it is read tensor by
    tensor (the float32 model is never held whole)."""
    if weights is not None:
        if weights not in _READERS:
            raise ValueError(f"weights={weights!r}: use one of {sorted(_READERS)}")
        return _READERS[weights](directory, config, convert)
    order = [FLAX_WEIGHTS, SAFE_WEIGHTS, TORCH_WEIGHTS]
    if convert is not None:
        order = [SAFE_WEIGHTS, FLAX_WEIGHTS, TORCH_WEIGHTS]
    for name in order:
        if any(os.path.exists(os.path.join(directory, f)) for f in _FILES[name]):
            return _READERS[name](directory, config, convert)
    raise FileNotFoundError(
        f"no weights in {directory}: expected one of {FLAX_WEIGHTS}, {SAFE_WEIGHTS} (or {SAFE_INDEX}), {TORCH_WEIGHTS}"
    )


def leaf_converter(param_dtype: Any, quantize: QuantSpec | None, on_device: bool) -> LeafConverter:
    """convert(path, float32 leaf) -> the leaf as stored: quantised where `quantize` applies (from the float32 values,
    remembering `param_dtype` as the dtype to dequantise to), else cast to `param_dtype`; a device array when
    `on_device`, else a host (numpy) one."""
    dtype_name = jnp.dtype(param_dtype).name

    def convert(path: tuple[str, ...], value: np.ndarray) -> Any:
        stored = quantize_leaf(path, value, quantize)
        if stored is not value:
            return stored.replace(dtype=dtype_name)
        value = np.asarray(value).astype(param_dtype)
        return jnp.asarray(value) if on_device else value

    return convert


def load_pretrained(
    path_or_hub_id: str,
    dtype: Any = jnp.float32,
    weights: str | None = None,
    *,
    param_dtype: Any = None,
    quantize: QuantSpec | str | None = None,
    mesh: Mesh | None = None,
    shard_params: bool = True,
    min_shard_size: int = sharding.MIN_SHARD_SIZE,
) -> tuple[BartForConditionalGeneration, dict]:
    """Loads a BART checkpoint -> (model, params).

    The checkpoint's generation settings (`generation_config.json`, else the generation keys of `config.json`, as
    transformers reads them) are kept as `model.generation_config`: `generate(model, params, ids, mask)` and
    `AdapterServer(model, base)` use them unless overridden, and `save_pretrained(dir, params, model)` writes them
    back. A generation setting lora_jax does not implement raises here, naming it.

    dtype: the model's computation dtype (float32 default, bfloat16 allowed).
    param_dtype: the dtype the weights are stored in (default: `dtype`); e.g. bfloat16 weights computing in float32.
    quantize: "int8", "nf4" or a `QuantSpec`: every Dense kernel is stored quantised (`lora_jax.quantization`).
      Each weight is converted (cast or quantised) as it is read, one at a time: from model.safetensors (preferred
      when present) the float32 model is never held whole.
    weights: force a weights file ("flax_model.msgpack", "model.safetensors", "pytorch_model.bin"); default: the first of
      those found, in that order.
    mesh: load straight into this mesh: weights are read into host memory once and each device receives only its
      shard (`sharding.tree_shardings` with shard_params / min_shard_size); `x.sharding` of each leaf tells where it is.
    """
    directory = resolve(str(path_or_hub_id))
    config = BartConfig.from_pretrained(directory)
    activation(config.activation_function)  # an unsupported activation fails here, naming it, not at the first call
    param_dtype = dtype if param_dtype is None else param_dtype
    # The checkpoint's generation settings travel with the model: generate / AdapterServer use them by default.
    generation_config = load_generation_config(directory)
    model = BartForConditionalGeneration(config, dtype=dtype, param_dtype=param_dtype,
                                         generation_config=generation_config)
    convert = None
    if quantize is not None or jnp.dtype(param_dtype) != jnp.float32:
        convert = leaf_converter(param_dtype, as_spec(quantize), on_device=mesh is None)
    params = read_params(directory, config, weights, convert)
    if convert is None:
        params = jax.tree_util.tree_map(jnp.asarray if mesh is None else np.asarray, params)
    if mesh is None:
        return model, params
    return model, sharding.put_sharded(params, sharding.tree_shardings(params, mesh, shard_params, min_shard_size))


def load_tokenizer(path_or_hub_id: str):
    """The tokenizer saved with a checkpoint (`transformers.AutoTokenizer`)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve(str(path_or_hub_id)))


def _generation_json(generation_config) -> dict | None:
    """What generation_config.json holds; a dict is checked first (a setting lora_jax would refuse on loading is
    refused before anything is written)."""
    if generation_config is None:
        return None
    if isinstance(generation_config, GenerationConfig):
        return generation_config.to_json_dict()
    settings = dict(generation_config)
    GenerationConfig.from_dict(settings, where="save_pretrained generation_config")
    return settings


def save_pretrained(
    directory: str,
    params: Mapping,
    config: BartConfig | BartForConditionalGeneration,
    *,
    tokenizer_dir: str | None = None,
    generation_config: Mapping[str, Any] | Any | None = None,
    safetensors: bool = True,
    flax: bool = True,
) -> None:
    """Writes a Hugging Face checkpoint directory: `config.json`, `model.safetensors` (PyTorch layout, loadable by
    `BartForConditionalGeneration.from_pretrained`) and/or `flax_model.msgpack`, plus tokenizer files copied from
    `tokenizer_dir` and `generation_config.json`: `generation_config` when given (a dict or a GenerationConfig), else
    the model's own settings when `config` is a model (`save_pretrained(dir, params, model)`, e.g. the model from
    `load_pretrained`, whose checkpoint settings are thereby written back).

    A tree holding any untied leaf (`lora_jax.models.tying.UNTIED_LEAVES`) is written untied
    (`tie_word_embeddings: false`, missing ones copied from the shared embedding), whatever `config` says."""
    from safetensors.numpy import save

    if not isinstance(config, BartConfig):  # a model: its config, and its generation settings unless given
        generation_config = getattr(config, "generation_config", None) if generation_config is None else generation_config
        config = config.config
    settings = _generation_json(generation_config)
    os.makedirs(directory, exist_ok=True)
    if has_untied_leaves(params) or not config.tie_word_embeddings:
        # A tree with a head or token embedding of its own (an untied base, or a merged PEFT modules_to_save copy)
        # is saved untied with all four weights, so transformers and load_pretrained read back exactly this model.
        params, config = untie_embeddings(params), dataclasses.replace(config, tie_word_embeddings=False)
    if safetensors:
        state = params_to_torch_state_dict(params)
        atomic_write(os.path.join(directory, SAFE_WEIGHTS), save(state, metadata={"format": "pt"}))
    if flax:
        blob = serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, jax.device_get(dict(params))))
        atomic_write(os.path.join(directory, FLAX_WEIGHTS), blob)
    atomic_write(os.path.join(directory, "config.json"), json.dumps(config.to_hf_dict(), indent=2))
    if settings is not None:
        atomic_write(os.path.join(directory, "generation_config.json"), json.dumps(settings, indent=2))
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(directory, name))
