"""BART hyper-parameters as a frozen (hashable) dataclass, read from a Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# The BART-base architecture (facebook/bart-base), so a model of that size builds without a download.
BART_BASE: dict[str, Any] = dict(
    vocab_size=50265,
    d_model=768,
    encoder_layers=6,
    decoder_layers=6,
    encoder_attention_heads=12,
    decoder_attention_heads=12,
    encoder_ffn_dim=3072,
    decoder_ffn_dim=3072,
    max_position_embeddings=1024,
    activation_function="gelu",
    dropout=0.1,
    attention_dropout=0.1,
    activation_dropout=0.1,
    scale_embedding=False,
    forced_bos_token_id=0,
    no_repeat_ngram_size=3,
    num_beams=4,
)


# Settings of BART-like configs that change the architecture, with the value that means "plain BART". Old BART
# configs (fairseq-era) spell these out with BART's values; mBART/Marian/PLBart-style values are refused, since
# loading such a checkpoint as BART would run without error and compute something else.
BART_ONLY_SETTINGS: dict[str, Any] = {
    "normalize_before": False,  # pre-LayerNorm layers (mBART style)
    "add_final_layer_norm": False,  # a LayerNorm after the last layer (mBART style)
    "add_bias_logits": False,  # a learned bias on the logits besides final_logits_bias
    "normalize_embedding": True,  # layernorm_embedding present
    "static_position_embeddings": False,  # sinusoidal positions (Marian style)
    "extra_pos_embeddings": 2,  # BART's learned-position offset
    "is_encoder_decoder": True,
}
MODEL_TYPES = ("bart",)


def check_supported(raw: dict[str, Any], where: str = "config.json") -> None:
    """Raises ValueError naming the first setting of a raw `config.json` dict that this BART does not implement:
    another `model_type`, or an architecture switch of `BART_ONLY_SETTINGS` set to a non-BART value."""
    model_type = raw.get("model_type", "bart")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"{where}: model_type {model_type!r} is not BART; lora_jax implements model_type 'bart' only "
            "(loading another architecture's weights as BART would compute something else)"
        )
    for key, bart_value in BART_ONLY_SETTINGS.items():
        if key in raw and raw[key] != bart_value:
            raise ValueError(
                f"{where}: {key}={raw[key]!r} is not implemented by lora_jax's BART (which has {key}={bart_value!r}); "
                "this checkpoint is not a plain BART and cannot be loaded as one"
            )


@dataclasses.dataclass(frozen=True)
class BartConfig:
    """The architecture fields of a BART `config.json` (names as in `transformers.BartConfig`)."""

    vocab_size: int = 50265
    d_model: int = 768
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 12
    decoder_attention_heads: int = 12
    encoder_ffn_dim: int = 3072
    decoder_ffn_dim: int = 3072
    max_position_embeddings: int = 1024
    activation_function: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    init_std: float = 0.02
    scale_embedding: bool = False
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    decoder_start_token_id: int = 2
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = 2
    # False: the encoder's and the decoder's token embeddings and the LM head are weights of their own, beside
    # `model.shared` (transformers saves all four); True (BART's default): all four are `model.shared`.
    tie_word_embeddings: bool = True
    # Generation defaults carried by some configs (bart-large-cnn); generation_config.json overrides them.
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_length: int = 0
    max_length: int = 20
    early_stopping: bool = False
    name_or_path: str = ""

    @property
    def embed_scale(self) -> float:
        return self.d_model**0.5 if self.scale_embedding else 1.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BartConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path: str) -> "BartConfig":
        """Reads `config.json` with `transformers.BartConfig` (so its defaults and aliases apply), after refusing any
        setting this BART does not implement (see `check_supported`)."""
        from transformers import BartConfig as HFBartConfig

        config_file = os.path.join(path, "config.json")
        if os.path.exists(config_file):
            with open(config_file) as f:
                check_supported(json.load(f), config_file)
        hf = HFBartConfig.from_pretrained(path)
        d = hf.to_dict()
        d["name_or_path"] = str(path)
        return cls.from_dict(d)

    def to_hf_dict(self) -> dict[str, Any]:
        """A `config.json` dict that `transformers.BartConfig` / `BartForConditionalGeneration` accept."""
        d = dataclasses.asdict(self)
        d.pop("name_or_path")
        d.update(
            model_type="bart",
            architectures=["BartForConditionalGeneration"],
            is_encoder_decoder=True,
            num_hidden_layers=self.encoder_layers,
        )
        return d

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)


def bart_base_config(**overrides: Any) -> BartConfig:
    """The `facebook/bart-base` architecture (random weights are the caller's business)."""
    return BartConfig(**{**BART_BASE, **overrides, "name_or_path": "facebook/bart-base"})
