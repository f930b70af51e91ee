"""`LoraConfig`: what to adapt and how, as a frozen (hashable, so jit-static) dataclass."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Annotated, Any, Mapping

from lora_jax.ranges import Ge, Gt, Interval, check_fields, range_violation

INIT_CHOICES = ("gaussian", "kaiming_uniform", "pissa", "pissa_niter_<K>", "olora")
# Initialisations that take the adapter from W's own decomposition and leave a residual base (residual_init.py).
RESIDUAL_INITS = re.compile(r"pissa|pissa_niter_[1-9][0-9]*|olora")
Rank = Annotated[int, Ge(1)]
Alpha = Annotated[float, Gt(0)]  # alpha <= 0 would scale the update to nothing or flip its sign


def _as_pairs(value: Any, name: str) -> tuple[tuple[str, Any], ...]:
    if value is None:
        return ()
    if isinstance(value, Mapping):
        return tuple(value.items())
    try:
        return tuple((str(k), v) for k, v in value)
    except (TypeError, ValueError):
        raise TypeError(f"LoraConfig.{name} must be a mapping of path pattern -> value, got {value!r}") from None


def _as_names(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not all(isinstance(v, str) for v in value):
        raise TypeError(f"LoraConfig.{name} must be strings (module names or regexes), got {value!r}")
    return tuple(value)


def path_matches(pattern: str, path: str) -> bool:
    """True when `pattern` (a module name like "q_proj" or a regex like "decoder/layers/.*/(q|v)_proj") matches the
    '/'-joined `path` as a whole or as a suffix that starts at a '/' boundary (PEFT's rule, with '/' for '.')."""
    return re.fullmatch(rf"(?:.*/)?(?:{pattern})", path) is not None


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adaptation settings.

    rank / alpha: r and alpha; the update is scale * A @ B with scale = alpha / r (alpha / sqrt(r) with use_rslora).
    targets: module names ("q_proj") or regexes over '/'-joined module paths
      ("model/decoder/layers/0/encoder_attn/q_proj"); each must match at least one 2-D `kernel` (a Dense) or
      `embedding` (an Embed: the adapter then adds scale * A[ids] @ B to the looked-up rows).
    dropout: dropout rate on the adapter's input (the frozen path sees the undropped input), as in PEFT.
    rank_pattern / alpha_pattern: per-path overrides {pattern: value}; the first matching pattern wins.
    modules_to_save: names or regexes of modules or leaves that are trained and saved in full
      (e.g. "final_logits_bias", "layernorm_embedding").
    init: how the adapter starts. "gaussian" (A normal with std 1/r, the paper's choice) or "kaiming_uniform"
      (PEFT's default), B zero: the adapted model starts exactly at its base. "pissa" (A, B from the top-r singular
      triplets of W; "pissa_niter_K": randomized SVD with K subspace iterations) or "olora" (from a QR of W): the base
      kernel becomes the residual W - scale*A@B, so the model still starts at the base (lora_jax.lora.residual_init).
    use_dora: DoRA (weight-decomposed LoRA): a trained magnitude vector `lora_magnitude` (out,) rescales each output
      column of W + scale*A@B to that norm (lora_jax.lora.dora).
    """

    rank: Rank = 8
    alpha: Alpha = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    dropout: Annotated[float, Interval(ge=0, lt=1)] = 0.0
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    use_rslora: bool = False
    modules_to_save: tuple[str, ...] = ()
    init: str = "gaussian"
    use_dora: bool = False

    def __post_init__(self):
        # Accept lists and dicts from callers and YAML, store tuples so the config stays hashable.
        object.__setattr__(self, "targets", _as_names(self.targets, "targets"))
        object.__setattr__(self, "modules_to_save", _as_names(self.modules_to_save, "modules_to_save"))
        object.__setattr__(self, "rank_pattern", _as_pairs(self.rank_pattern, "rank_pattern"))
        object.__setattr__(self, "alpha_pattern", _as_pairs(self.alpha_pattern, "alpha_pattern"))
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the field: ranges as declared on the fields (rank >= 1, alpha > 0, dropout in
        [0, 1)), the same for the values of rank_pattern / alpha_pattern, and well-formed patterns."""
        check_fields(self, "LoraConfig")
        for name, hint, pairs in (("rank_pattern", Rank, self.rank_pattern), ("alpha_pattern", Alpha, self.alpha_pattern)):
            for pattern, value in pairs:
                if problem := range_violation(value, hint, check_type=True):
                    raise ValueError(f"LoraConfig.{name}[{pattern!r}] {problem}")
        if not self.targets:
            raise ValueError("LoraConfig.targets is empty: name at least one module, e.g. ('q_proj', 'v_proj')")
        if self.init not in INIT_CHOICES[:2] and not RESIDUAL_INITS.fullmatch(str(self.init)):
            raise ValueError(f"LoraConfig.init must be one of {INIT_CHOICES} (K >= 1), got {self.init!r}")
        if self.use_dora and self.residual_init:
            raise ValueError(f"LoraConfig: use_dora with init={self.init!r} is not supported (a DoRA adapter cannot be "
                             "converted back to the original base); use one or the other")
        for pattern in self.targets + self.modules_to_save + tuple(p for p, _ in self.rank_pattern + self.alpha_pattern):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"LoraConfig pattern {pattern!r} is not a valid regex: {e}") from None

    def rank_for(self, path: str) -> int:
        """The rank of the adapter on module `path` ('/'-joined)."""
        return next((r for p, r in self.rank_pattern if path_matches(p, path)), self.rank)

    def alpha_for(self, path: str) -> float:
        return next((a for p, a in self.alpha_pattern if path_matches(p, path)), self.alpha)

    def scale_for(self, path: str) -> float:
        """alpha / r (or alpha / sqrt(r) with rsLoRA) for the module at `path`."""
        r = self.rank_for(path)
        return self.alpha_for(path) / (math.sqrt(r) if self.use_rslora else r)

    @property
    def residual_init(self) -> bool:
        """True when the adapter starts from W's decomposition and the base kernel is replaced by a residual."""
        return RESIDUAL_INITS.fullmatch(self.init) is not None

    def is_target(self, path: str) -> bool:
        return any(path_matches(p, path) for p in self.targets)

    def is_saved_module(self, path: str) -> bool:
        return any(path_matches(p, path) for p in self.modules_to_save)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; `LoraConfig(**d)` rebuilds the config."""
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        d["modules_to_save"] = list(self.modules_to_save)
        d["rank_pattern"] = dict(self.rank_pattern)
        d["alpha_pattern"] = dict(self.alpha_pattern)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoraConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown LoraConfig field(s) {unknown}; valid fields are {sorted(names)}")
        return cls(**d)
