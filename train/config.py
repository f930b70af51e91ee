"""Run configuration: nested frozen dataclasses read from YAML, with `--set a.b=value` overrides.

The `lora`, `mesh` and `eval` sections are derived from the library's own configs (LoraConfig, MeshConfig,
GenerationConfig): their fields, types, ranges and defaults are declared once, there. Every numeric field declares its
valid range in its type (`Annotated[float, Gt(0)]`, see lora_jax/ranges.py), checked by `parse_section`. Every error
names the offending key (or the config file) and is raised before anything is loaded or compiled."""

from __future__ import annotations

import dataclasses
import difflib
import glob
import types
import typing
from typing import Annotated, Any, Literal, Mapping

import yaml

from lora_jax.sharding.distributed import LaunchSettings
from lora_jax.generation.config import GenerationConfig
from lora_jax.lora.config import LoraConfig
from lora_jax.models.attention import ATTENTION_IMPLEMENTATIONS
from lora_jax.models.bart import REMAT_POLICIES
from lora_jax.ranges import Ge, Gt, Interval, range_violation, split_annotated
from lora_jax.training.runtime import DEFAULT_COMPILATION_CACHE
from lora_jax.sharding import MeshConfig

Positive = Annotated[int, Ge(1)]  # counts, sizes and intervals: 0 would divide by zero or do nothing
Fraction = Annotated[float, Interval(ge=0, le=1)]


class ConfigError(ValueError):
    """A run configuration that cannot work; the message names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    checkpoint: str | None = None  # local dir or hub id; None = random init from init_config
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype of the model
    # Storage dtype of the (frozen) base weights; null = model.dtype. bfloat16 with dtype float32: half the weight
    # memory, float32 arithmetic (each kernel converted inside its layer's call).
    param_dtype: Literal["float32", "bfloat16"] | None = None
    # Store every Dense kernel of the base quantised (LoRA only): "int8" (per-output-channel absmax) or "nf4"
    # (QLoRA's 4-bit NormalFloat); the embedding, norms and biases stay in param_dtype.
    quantize: Literal["int8", "nf4"] | None = None
    tokenizer: str | None = None  # None = the checkpoint's
    init_config: dict | None = None  # BartConfig fields for a randomly initialised model
    remat: str | None = None  # rematerialise each layer in training: null, "dots" (same speed, less memory), "full"
    scan_layers: bool = True  # run each layer stack as one lax.scan (one layer body compiled, not one per layer)
    attention: str | None = None  # null (jax.nn.dot_product_attention, XLA), "xla", "cudnn" (NVIDIA GPU, bf16), "explicit"


def _yaml_hint(hint: Any) -> Any:
    """The type a YAML value for a field typed `hint` arrives as: a tuple of pairs as a mapping, a tuple as a list;
    a declared range (Annotated) is kept."""
    base, constraints = split_annotated(hint)
    if constraints:
        return Annotated[(_yaml_hint(base), *constraints)]
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        return dict if args and typing.get_origin(args[0]) is tuple else list | tuple
    return hint


def derived_section(name: str, source: type, *, names: typing.Iterable[str] | None = None,
                    defaults: Mapping[str, Any] | None = None, extra: typing.Sequence[tuple] = ()) -> type:
    """A frozen dataclass `name` with the fields of dataclass `source` (or those in `names`), their types as YAML
    writes them, their ranges and their defaults (or `defaults`' values), followed by the `extra` (name, type,
    default) fields."""
    hints, defaults = typing.get_type_hints(source, include_extras=True), dict(defaults or {})
    fields = []
    for f in dataclasses.fields(source):
        if names is None or f.name in names:
            default = defaults.get(f.name, f.default)
            hint = _yaml_hint(hints[f.name])
            if default is None and f.default is not None:  # null: inherit (e.g. the checkpoint's generation setting)
                base, constraints = split_annotated(hint)
                hint = Annotated[(base | None, *constraints)] if constraints else base | None
            fields.append((f.name, hint, dataclasses.field(default=default)))
    fields += [(n, t, dataclasses.field(default=d)) for n, t, d in extra]
    return dataclasses.make_dataclass(name, fields, frozen=True)


# `lora`: every LoraConfig field, plus what the run does with it.
LoraSection = derived_section("LoraSection", LoraConfig, extra=[
    ("mode", Literal["lora", "full"], "lora"),  # "full": fine-tune every parameter, the LoraConfig fields unused
    ("loraplus_lr_ratio", Annotated[float | None, Gt(0)], None),  # LoRA+: the B matrices' learning rate is this times the others'
    ("dtype", Literal["float32", "bfloat16"], "float32"),  # the adapters' dtype (and their optimizer state's)
])


@dataclasses.dataclass(frozen=True)
class DataSection:
    dataset: str | None = None  # hub dataset name; None = local files
    dataset_config: str | None = None
    train_files: str | None = None  # path or glob of json / jsonl / csv / parquet
    eval_files: str | None = None
    test_files: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    test_split: str = "test"
    source_column: str = "source"
    target_column: str = "target"
    max_source_length: Positive = 512
    max_target_length: Positive = 128
    padding: Literal["bucket", "fixed"] = "bucket"
    objective: Literal["summarization", "denoising"] = "summarization"
    # denoising only (BART text infilling, lora_jax.data.denoising):
    mask_ratio: Fraction = 0.3  # share of each text's tokens replaced by <mask> spans
    clean_fraction: Fraction = 0.0  # share of examples left un-noised: they teach the model to copy its input
    join_rows: Positive = 1  # an example joins 1..join_rows consecutive rows with newlines (multi-paragraph texts)
    max_eval_examples: Annotated[int | None, Ge(1)] = None  # None: all
    num_proc: Annotated[int | None, Ge(1)] = None  # datasets' worker processes; None: none
    cast_to_string: bool = False  # train on str(value) of non-text source/target values (default: refuse them)


@dataclasses.dataclass(frozen=True)
class OptimSection:
    learning_rate: Annotated[float, Gt(0)] = 1e-3
    warmup_steps: Annotated[int, Ge(0)] = 0  # may exceed num_steps (the rate then never reaches its peak)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: Annotated[float, Ge(0)] = 0.0
    b1: Annotated[float, Interval(ge=0, lt=1)] = 0.9
    b2: Annotated[float, Interval(ge=0, lt=1)] = 0.999
    eps: Annotated[float, Gt(0)] = 1e-8
    max_grad_norm: Annotated[float | None, Gt(0)] = 1.0  # None: no clipping
    grad_accum_steps: Positive = 1
    label_smoothing: Annotated[float, Interval(ge=0, lt=1)] = 0.0


@dataclasses.dataclass(frozen=True)
class TrainSection:
    batch_size: Positive = 8
    eval_batch_size: Positive = 16
    num_steps: Positive = 1000
    eval_every: Positive = 500
    save_every: Positive = 500
    keep_checkpoints: Positive = 2
    log_every: Positive = 10
    # numpy's generators (data order, noise) refuse negative seeds, and jax's PRNGKey(seed + 1) needs a C long
    seed: Annotated[int, Interval(ge=0, lt=2**32)] = 0
    output_dir: str = "runs/default"
    # Divergence guard (train/guard.py): a step whose loss or gradient norm is not finite is skipped (not applied);
    # this many skipped steps in a row stop the run.
    max_nonfinite_steps: Positive = 10
    # Stop when a logged train loss exceeds this multiple of the median of the earlier logged losses (null: off).
    divergence_factor: Annotated[float | None, Gt(1)] = 3.0
    # JAX's persistent compilation cache: a re-run or resume reads its compiled steps from here (null: off).
    compile_cache_dir: str | None = DEFAULT_COMPILATION_CACHE


# `eval`: the generation settings of ROUGE evaluation (GenerationConfig fields on top of the checkpoint's own
# generation settings; null, the default, keeps the checkpoint's), and how much to evaluate.
EVAL_GENERATION_FIELDS = ("num_beams", "max_new_tokens", "length_penalty", "no_repeat_ngram_size")
EvalSection = derived_section("EvalSection", GenerationConfig, names=EVAL_GENERATION_FIELDS,
                              defaults=dict.fromkeys(EVAL_GENERATION_FIELDS), extra=[
    ("num_samples", Annotated[int, Ge(0)], 3),  # sample summaries printed and written to samples.txt
    ("rouge_before", bool, True),  # also score the model before training
    ("max_examples", Annotated[int | None, Ge(1)], 200),  # rows of the eval split scored with ROUGE (None: all)
])


# `distributed`: how this process joins a multi-process job (None: from the launcher's environment; see
# lora_jax/sharding/distributed.py) and how long a silent peer is waited for before every process stops.
DistributedSection = derived_section("DistributedSection", LaunchSettings)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelSection = ModelSection()
    lora: LoraSection = LoraSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedSection = DistributedSection()


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typing.get_origin(hint) or hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is dict:
        return "a mapping"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def parse_section(cls, values: Mapping[str, Any], prefix: str):
    """An instance of section dataclass `cls` from a YAML mapping, every key and type checked (sections nest);
    `prefix` is the dotted path of `values`, for error messages. Numbers must lie in the range their field declares
    (and floats must be finite); checks across keys are `validate`'s."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(prefix + n for n in names)}"
            raise ConfigError(f"unknown config key '{where}'{hint}")
        hint = split_annotated(hints[key])[0]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = parse_section(hint, value or {}, f"{where}.")
            continue
        if not _type_ok(value, hint):
            raise ConfigError(f"config key '{where}' must be {_describe(hint)}, got {value!r} ({type(value).__name__})")
        if problem := range_violation(value, hints[key]):
            raise ConfigError(f"config key '{where}' {problem}")
        kwargs[key] = float(value) if hint is float or (hint == (float | None) and isinstance(value, int)) else value
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{k}' is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.learning_rate=3e-4' -> ('optim.learning_rate', 0.0003); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip(), _fix_numbers(yaml.safe_load(raw) if raw.strip() else None)


def _fix_numbers(tree: Any) -> Any:
    """YAML 1.1 reads '3e-4' (no dot) as a string: turn strings that are numbers written with digits into floats,
    in files and overrides alike ('inf' or 'nan' stay strings)."""
    if isinstance(tree, dict):
        return {k: _fix_numbers(v) for k, v in tree.items()}
    if isinstance(tree, str) and any(c.isdigit() for c in tree):
        try:
            return float(tree)
        except ValueError:
            return tree
    return tree


def validate(cfg: RunConfig) -> RunConfig:
    """Checks across keys, and those of things other than numbers (the ranges were checked by `parse_section`):
    the LoraConfig itself (patterns, targets), divisibility, remat, model and data sources, files."""
    if cfg.lora.mode == "lora":
        try:
            to_lora_config(cfg)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"lora: {e}") from None
    if cfg.train.batch_size % cfg.optim.grad_accum_steps:
        raise ConfigError(
            f"train.batch_size ({cfg.train.batch_size}) must be divisible by optim.grad_accum_steps ({cfg.optim.grad_accum_steps})"
        )
    if cfg.model.remat is not None and cfg.model.remat not in REMAT_POLICIES:
        raise ConfigError(f"config key 'model.remat' must be null or one of {sorted(REMAT_POLICIES)}, got {cfg.model.remat!r}")
    if cfg.model.quantize is not None and cfg.lora.mode == "full":
        raise ConfigError(f"model.quantize={cfg.model.quantize!r} needs lora.mode 'lora': quantised kernels are frozen "
                          "(set model.quantize: null to fine-tune every weight)")
    if cfg.model.attention not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"config key 'model.attention' must be one of {list(ATTENTION_IMPLEMENTATIONS)}, got {cfg.model.attention!r}")
    if cfg.model.checkpoint is None and cfg.model.init_config is None:
        raise ConfigError("model.checkpoint is null: give a checkpoint (dir or hub id) or model.init_config for random init")
    if cfg.model.checkpoint is None and cfg.model.tokenizer is None:
        raise ConfigError("model.tokenizer is required when model.checkpoint is null")
    if cfg.data.dataset is None:
        if cfg.data.train_files is None:
            raise ConfigError("data.dataset is null: set data.train_files (and data.eval_files) to local files, or a hub dataset")
        for key in ("train_files", "eval_files", "test_files"):
            pattern = getattr(cfg.data, key)
            if pattern is not None and not glob.glob(pattern):
                raise ConfigError(f"config key 'data.{key}': no file matches {pattern!r}")
    return cfg


def _yaml_problem(e: yaml.YAMLError) -> str:
    """'line 3, column 7: mapping values are not allowed here' from a YAML error (one line)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or " ".join(str(e).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def read_config_file(path: str) -> dict:
    """The mapping a YAML config file holds ({} for an empty file); ConfigError naming the file when it cannot be read,
    is not UTF-8 text, is not valid YAML or does not hold a mapping of sections."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
        tree = yaml.safe_load(text)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path!r} is a directory; pass a YAML file such as configs/demo.yaml") from None
    except OSError as e:
        raise ConfigError(f"config file {path!r} cannot be read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): "
                          "a config is a YAML text file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {_yaml_problem(e)}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of sections (model:, data:, ...), "
                          f"got a {type(tree).__name__}")
    return tree


def load_config(path: str | None, overrides: typing.Iterable[str] = ()) -> RunConfig:
    """RunConfig from a YAML file plus `section.key=value` overrides, validated."""
    tree = read_config_file(path) if path is not None else {}
    tree = _fix_numbers(tree)
    for text in overrides:
        _set_dotted(tree, *parse_override(text))
    return validate(parse_section(RunConfig, tree, ""))


def to_lora_config(cfg: RunConfig) -> LoraConfig | None:
    """The LoraConfig of a run (None for full fine-tuning)."""
    if cfg.lora.mode == "full":
        return None
    return LoraConfig(**{f.name: getattr(cfg.lora, f.name) for f in dataclasses.fields(LoraConfig)})


def to_launch_settings(cfg: RunConfig) -> LaunchSettings:
    """The distributed section as lora_jax.sharding.distributed.LaunchSettings."""
    return LaunchSettings(**dataclasses.asdict(cfg.distributed))


def generation_overrides(cfg: RunConfig) -> dict[str, Any]:
    """The eval section's GenerationConfig fields (to put on top of the checkpoint's generation config)."""
    return {name: getattr(cfg.eval, name) for name in EVAL_GENERATION_FIELDS}


def config_to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)
