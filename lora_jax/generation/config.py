"""Decoding settings: `GenerationConfig` and how they are read from a checkpoint or a model config."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Annotated, Any, Mapping

from lora_jax.ranges import Ge, check_fields

TokenId = Annotated[int, Ge(0)]


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings (names and meanings as in `transformers.GenerationConfig`).

    max_new_tokens excludes the decoder start token; min_length and max_length count it (total decoder length).
    When max_new_tokens is set it wins over max_length (max_length = max_new_tokens + 1), as in transformers.
    The special-token defaults are BART's; `load_generation_config` / `config_from_model` fill in the model's."""

    num_beams: Annotated[int, Ge(1)] = 1
    max_new_tokens: Annotated[int | None, Ge(1)] = None
    max_length: Annotated[int, Ge(1)] = 20
    min_length: Annotated[int, Ge(0)] = 0
    length_penalty: float = 1.0  # any finite value (negative favours short beams)
    no_repeat_ngram_size: Annotated[int, Ge(0)] = 0
    early_stopping: bool | str = False
    forced_bos_token_id: Annotated[int | None, Ge(0)] = None
    forced_eos_token_id: Annotated[int | None, Ge(0)] = None
    decoder_start_token_id: TokenId = 2
    eos_token_id: TokenId = 2
    pad_token_id: TokenId = 1

    def __post_init__(self):
        check_fields(self, "GenerationConfig")  # declared ranges, and finite floats

    @property
    def total_length(self) -> int:
        """Length of the output buffer, start token included."""
        return self.max_new_tokens + 1 if self.max_new_tokens is not None else self.max_length

    def to_dict(self) -> dict[str, Any]:
        """Every field, None included (an explicit None switches an optional setting off), as generation_config.json
        holds them: `from_dict(to_dict())` and `load_generation_config` read back this same config."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "GenerationConfig":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GenerationConfig":
        """Known fields of a transformers generation config; other keys are ignored, except settings asking for
        something this module does not do (sampling, several returned sequences), which raise."""
        if d.get("do_sample"):
            raise ValueError("do_sample=True is not supported: generate does greedy and beam search only")
        if d.get("num_return_sequences", 1) not in (1, None):
            raise ValueError("num_return_sequences > 1 is not supported: generate returns the best sequence per input")
        # An explicit None switches an optional setting off (forced tokens, max_new_tokens); elsewhere it means unset.
        optional = {"max_new_tokens", "forced_bos_token_id", "forced_eos_token_id"}
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in d.items() if k in names and (v is not None or k in optional)}
        if isinstance(fields.get("eos_token_id"), (list, tuple)):
            eos = fields["eos_token_id"]
            if len(eos) != 1:
                raise ValueError(f"eos_token_id={eos}: only a single end-of-sequence token is supported")
            fields["eos_token_id"] = eos[0]
        return cls(**fields)

    def validate(self) -> None:
        """Raises ValueError naming the bad setting (the numeric ranges were checked on construction)."""
        if self.total_length < 2:
            raise ValueError(f"max_length={self.max_length} leaves no room to generate; set max_new_tokens >= 1")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def load_generation_config(directory: str) -> GenerationConfig:
    """Settings from a checkpoint directory: `generation_config.json` wins over `config.json`, which wins over
    transformers' defaults (num_beams 1, length_penalty 1.0, no_repeat_ngram_size 0, min_length 0,
    early_stopping False, no forced tokens, max_length 20). An explicit null in generation_config.json switches a
    forced token off even when config.json sets it."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory!r} is not a directory; pass a checkpoint directory holding config.json")
    merged = {k: v for k, v in _read_json(os.path.join(directory, "config.json")).items() if v is not None}
    merged.update(_read_json(os.path.join(directory, "generation_config.json")))
    return GenerationConfig.from_dict(merged)


def config_from_model(model_config) -> GenerationConfig:
    """Defaults from a model config such as BartConfig (its generation fields and special tokens)."""
    names = [f.name for f in dataclasses.fields(GenerationConfig)]
    return GenerationConfig.from_dict({n: getattr(model_config, n) for n in names if hasattr(model_config, n)})
