"""Decoding settings: `GenerationConfig`, read from a checkpoint (as transformers reads it) or a model config."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Annotated, Any, Mapping

from lora_jax.generation.settings import generation_keys, normalise, refuse_unsupported
from lora_jax.ranges import Ge, Gt, Interval, Le, check_fields

DEFAULT_NEW_TOKENS = 20  # transformers' default when neither max_length nor max_new_tokens is set
TokenId = Annotated[int, Ge(0)]
TokenIds = int | tuple[int, ...]  # one id, or several (e.g. several end-of-sequence tokens)
Probability = Annotated[float, Interval(ge=0.0, le=1.0)]


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings (names, meanings and defaults as in `transformers.GenerationConfig`).

    max_new_tokens excludes the decoder start token; min_length and max_length count it (total decoder length).
    When max_new_tokens is set it wins over max_length (max_length = max_new_tokens + 1); when neither is set,
    20 tokens are generated (max_length 21, at most the model's positions), as in transformers.
    Token-id lists are tuples (the config is hashable: it is a static argument of the compiled search).
    The special-token defaults are BART's; `load_generation_config` / `config_from_model` fill in the model's."""

    # search
    num_beams: Annotated[int, Ge(1)] = 1
    num_beam_groups: Annotated[int, Ge(1)] = 1
    diversity_penalty: float = 0.0
    num_return_sequences: Annotated[int, Ge(1)] = 1
    early_stopping: bool | str = False
    length_penalty: float = 1.0  # any finite value (negative favours short beams)
    # lengths
    max_new_tokens: Annotated[int | None, Ge(1)] = None
    max_length: Annotated[int | None, Ge(1)] = None  # None: DEFAULT_NEW_TOKENS new tokens, as in transformers
    min_length: Annotated[int, Ge(0)] = 0
    min_new_tokens: Annotated[int | None, Ge(0)] = None
    # logits processors
    repetition_penalty: Annotated[float, Gt(0)] = 1.0
    encoder_repetition_penalty: Annotated[float, Gt(0)] = 1.0
    no_repeat_ngram_size: Annotated[int, Ge(0)] = 0
    encoder_no_repeat_ngram_size: Annotated[int, Ge(0)] = 0
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None
    sequence_bias: tuple[tuple[tuple[int, ...], float], ...] | None = None
    suppress_tokens: tuple[int, ...] | None = None
    begin_suppress_tokens: tuple[int, ...] | None = None
    exponential_decay_length_penalty: tuple[int, float] | None = None
    remove_invalid_values: bool = False
    renormalize_logits: bool = False
    forced_bos_token_id: Annotated[int | None, Ge(0)] = None
    forced_eos_token_id: TokenIds | None = None
    # sampling
    do_sample: bool = False
    temperature: Annotated[float, Gt(0)] = 1.0
    top_k: Annotated[int, Ge(0)] = 50  # 0: off
    top_p: Probability = 1.0
    min_p: Annotated[float | None, Interval(ge=0.0, le=1.0)] = None
    typical_p: Annotated[float, Gt(0), Le(1.0)] = 1.0
    # special tokens
    decoder_start_token_id: TokenId = 2
    eos_token_id: TokenIds = 2
    pad_token_id: TokenId = 1

    def __post_init__(self):
        check_fields(self, "GenerationConfig")  # declared ranges, and finite floats

    @property
    def total_length(self) -> int:
        """Length of the output buffer, start token included."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens + 1
        return self.max_length if self.max_length is not None else DEFAULT_NEW_TOKENS + 1

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def to_dict(self) -> dict[str, Any]:
        """Every field, None included (an explicit None switches an optional setting off): `from_dict(to_dict())`
        is this same config."""
        return dataclasses.asdict(self)

    def to_json_dict(self) -> dict[str, Any]:
        """What `generation_config.json` holds: the settings that differ from transformers' defaults, and the special
        tokens (transformers and `load_generation_config` both read it back as this config)."""
        tokens = ("decoder_start_token_id", "eos_token_id", "pad_token_id")
        defaults = GenerationConfig.__dataclass_fields__
        return {k: v for k, v in self.to_dict().items()
                if k in tokens or (v != defaults[k].default and not (k == "max_length" and self.max_new_tokens))}

    def replace(self, **changes: Any) -> "GenerationConfig":
        """A copy with `changes` that are not None (None means "inherit"); values as `from_dict` takes them."""
        changes = {k: v for k, v in changes.items() if v is not None}
        refuse_unsupported(changes, FIELDS, "generate")
        return dataclasses.replace(self, **normalise(changes))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], base: "GenerationConfig | None" = None,
                  where: str = "generation settings") -> "GenerationConfig":
        """A transformers generation config (dict / JSON) -> GenerationConfig, on top of `base` (default: the
        defaults). Raises ValueError naming any setting that would change the ids and is not implemented, or that
        is unknown. An explicit None switches an optional setting off (forced tokens, max_new_tokens, ...);
        elsewhere it means unset, as in transformers."""
        refuse_unsupported(d, FIELDS, where)
        defaults = cls.__dataclass_fields__
        fields = {k: v for k, v in d.items() if k in FIELDS and (v is not None or defaults[k].default is None)}
        return dataclasses.replace(base or cls(), **normalise(fields))

    def validate(self) -> None:
        """Raises ValueError naming the bad setting (the numeric ranges were checked on construction)."""
        if self.total_length < 2:
            raise ValueError(f"max_length={self.max_length} leaves no room to generate; set max_new_tokens >= 1")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        beams, groups, n = self.num_beams, self.num_beam_groups, self.num_return_sequences
        if n > 1 and beams == 1 and not self.do_sample:
            raise ValueError(f"num_return_sequences={n} needs do_sample=True or num_beams >= {n}: greedy search "
                             "has only one sequence per input")
        if beams > 1 and n > beams:
            raise ValueError(f"num_return_sequences={n} must be <= num_beams={beams} (the n best beams are returned)")
        if groups > 1 or self.diversity_penalty != 0.0:
            self._validate_groups()
        if self.exponential_decay_length_penalty is not None and self.exponential_decay_length_penalty[0] < 0:
            raise ValueError("exponential_decay_length_penalty start index must be >= 0")

    def _validate_groups(self) -> None:
        """Group (diverse) beam search: the combinations transformers (4.55, the last release with it in core)
        accepts; the others raise there too."""
        beams, groups, penalty = self.num_beams, self.num_beam_groups, self.diversity_penalty
        where = f"num_beam_groups={groups}, diversity_penalty={penalty}: group (diverse) beam search"
        if beams == 1 or groups > beams:
            raise ValueError(f"{where} needs num_beams > 1 and num_beam_groups <= num_beams, got num_beams={beams}")
        if groups == 1:
            raise ValueError(f"{where} needs num_beam_groups > 1 (diversity_penalty only acts between groups); "
                             "set num_beam_groups or diversity_penalty=0")
        if beams % groups:
            raise ValueError(f"{where}: num_beams={beams} must be divisible by num_beam_groups={groups}")
        if penalty <= 0.0:
            raise ValueError(f"{where} needs diversity_penalty > 0 (0 makes every group the same search)")
        if self.do_sample:
            raise ValueError(f"{where} cannot sample: set do_sample=False")


FIELDS = frozenset(f.name for f in dataclasses.fields(GenerationConfig))


def _read_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def load_generation_config(directory: str) -> GenerationConfig:
    """Settings from a checkpoint directory, as transformers (5.x) reads them: `generation_config.json` when it
    exists, else the generation keys of `config.json` (legacy checkpoints such as bart-large-cnn), over transformers'
    defaults (greedy, max_length 20, no forced tokens). Raises ValueError naming a setting lora_jax does not
    implement. Special tokens missing from the file come from config.json."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory!r} is not a directory; pass a checkpoint directory holding config.json")
    config_file = os.path.join(directory, "config.json")
    model_config = _read_json(config_file) if os.path.exists(config_file) else {}
    tokens = {k: model_config[k] for k in ("decoder_start_token_id", "eos_token_id", "pad_token_id")
              if model_config.get(k) is not None}
    base = GenerationConfig.from_dict(tokens, where=config_file)
    gen_file = os.path.join(directory, "generation_config.json")
    if os.path.exists(gen_file):
        return GenerationConfig.from_dict(_read_json(gen_file), base, where=gen_file)
    legacy = {k: v for k, v in model_config.items() if k in generation_keys(FIELDS)}
    return GenerationConfig.from_dict(legacy, base, where=config_file)


def config_from_model(model_config) -> GenerationConfig:
    """Defaults from a model config such as BartConfig (its generation fields and special tokens)."""
    values = {n: getattr(model_config, n) for n in FIELDS if hasattr(model_config, n)}
    return GenerationConfig.from_dict(values, where=type(model_config).__name__)


def model_generation_config(model) -> GenerationConfig:
    """The settings a model generates with by default: those loaded with it (`load_pretrained` keeps the
    checkpoint's as `model.generation_config`), else its config's generation fields. `model` may be a wrapper
    (LoraModel, MultiLoraModel) that forwards attributes to the module."""
    loaded = getattr(model, "generation_config", None)
    return loaded if isinstance(loaded, GenerationConfig) else config_from_model(model.config)
