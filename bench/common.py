"""What every benchmark child shares: the spec of one run, the model sizes, the seeded weights and batch (identical
for JAX and PyTorch), timing and memory measurement, and the one-JSON-line-per-measurement output.

Nothing here imports jax, lora_jax or torch: a PyTorch child must not carry the JAX runtime (about 170 MB of RSS)
into its peak-memory reading, nor a JAX child torch's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import time
import zlib
from typing import Any, Callable, Iterator, Mapping

import numpy as np

# Fields both configs share: special tokens, init and embedding scale as in BART, and generation settings
# neutralised so both frameworks decode with exactly the settings the bench passes.
_COMMON_FIELDS = dict(activation_function="gelu", init_std=0.02, scale_embedding=False, pad_token_id=1, bos_token_id=0,
                      eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None, forced_eos_token_id=None,
                      no_repeat_ngram_size=0, num_beams=1, min_length=0, length_penalty=1.0, early_stopping=False)

MODEL_SIZES: dict[str, dict[str, Any]] = {
    # The tiny fixture architecture (d 32, 2+2 layers, vocab 1000): a full run of every system fits in a minute.
    "tiny": dict(vocab_size=1000, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
                 dropout=0.1, attention_dropout=0.0, activation_dropout=0.0),
    # facebook/bart-base's config.json (as lora_jax.models.config.BART_BASE): d 768, 6+6 layers, 12 heads, FFN 3072,
    # vocab 50265, 1024 positions, dropout 0.1 everywhere.
    "base": dict(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                 decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024,
                 dropout=0.1, attention_dropout=0.1, activation_dropout=0.1),
    # facebook/bart-large's config.json: d 1024, 12+12 layers, 16 heads, FFN 4096, same vocab, positions and dropout.
    "large": dict(vocab_size=50265, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                  decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024,
                  dropout=0.1, attention_dropout=0.1, activation_dropout=0.1),
}

DEVICES = ("cpu", "gpu")
# Dense bfloat16 peak TFLOP/s of NVIDIA GPUs (vendor data sheets, SXM parts, no sparsity), by a substring of the
# device name: the denominator of MFU.
GPU_PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def gpu_peak_flops(device_name: str) -> float | None:
    return next((tflops * 1e12 for key, tflops in GPU_PEAK_BF16_TFLOPS.items() if key in device_name), None)


# Sizes used when --batch / --source-len / --target-len are not given.
DEFAULT_SHAPES = {"tiny": dict(batch=2, source_len=32, target_len=16), "base": dict(batch=4, source_len=256, target_len=64),
                  "large": dict(batch=4, source_len=256, target_len=64)}


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """One benchmark run's settings; every child receives the same spec (as JSON) so all systems see one config.

    steps: timed steps per training system (median reported); warmup: untimed steps before them (the first JAX
    call compiles). repeats: timed calls per inference measurement. dropout: None keeps the model size's dropout
    (applied identically on both sides; attention/activation dropout too). lora_dropout: PEFT `lora_dropout` and
    LoraConfig.dropout. num_beams / max_new_tokens: beam-search settings (max_new_tokens None = target_len).
    torch_threads: torch.set_num_threads (None = every core this process may use).
    remat: the lora_jax model's rematerialisation policy in both JAX training systems (None = off).
    scan_layers: the JAX training systems run each layer stack as one lax.scan (`model.scan_layers`).
    device: "cpu", or "gpu": every child runs on the GPU (JAX with bfloat16 compute over float32 weights, PyTorch
    with bfloat16 autocast and sdpa attention) and train rows report MFU.
    """

    model: str = "tiny"
    batch: int = 2
    source_len: int = 32
    target_len: int = 16
    steps: int = 5
    warmup: int = 1
    repeats: int = 10
    gen_repeats: int = 3
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_dropout: float = 0.1
    dropout: float | None = None
    learning_rate: float = 1e-4
    num_beams: int = 4
    max_new_tokens: int | None = None
    matmul_size: int = 2048
    torch_threads: int | None = None
    seed: int = 0
    remat: str | None = "dots"
    scan_layers: bool = True
    device: str = "cpu"

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        self.validate()

    def validate(self) -> None:
        if self.model not in MODEL_SIZES:
            raise ValueError(f"--model must be one of {sorted(MODEL_SIZES)}, got {self.model!r}")
        for name in ("batch", "source_len", "target_len", "steps", "repeats", "gen_repeats", "rank", "num_beams"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.remat not in (None, "dots", "dots_no_batch", "full"):  # lora_jax.models.bart.REMAT_POLICIES (not
            # imported: torch children must not load JAX)
            raise ValueError(f"--remat must be none, dots, dots_no_batch or full, got {self.remat!r}")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {DEVICES}, got {self.device!r}")
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1 (the first JAX step compiles, so it is never timed), got {self.warmup}")
        limit = self.model_fields()["max_position_embeddings"]
        if max(self.source_len, self.target_len, self.new_tokens + 1) > limit:
            raise ValueError(
                f"source_len={self.source_len}, target_len={self.target_len} or max_new_tokens+1={self.new_tokens + 1} "
                f"exceeds the {self.model} model's max_position_embeddings ({limit}); use shorter sequences"
            )

    @property
    def new_tokens(self) -> int:
        return self.max_new_tokens if self.max_new_tokens is not None else self.target_len

    def model_fields(self) -> dict[str, Any]:
        """The architecture as config fields that both `lora_jax.BartConfig` and `transformers.BartConfig` take."""
        fields = {**MODEL_SIZES[self.model], **_COMMON_FIELDS}
        if self.dropout is not None:
            fields.update(dropout=self.dropout, attention_dropout=self.dropout, activation_dropout=self.dropout)
        return fields

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "BenchSpec":
        return cls(**json.loads(text))

    def describe(self) -> dict[str, Any]:
        """The fields every result line carries, so a line stands on its own."""
        return dict(model=self.model, batch=self.batch, source_len=self.source_len, target_len=self.target_len)


# ---------------------------------------------------------------- weights and batch (numpy, seeded, shared)


def add_shape_arguments(parser) -> None:
    """--model, --batch, --source-len, --target-len with bench.run's reference setting as defaults (bart-base size,
    batch 4, 256/64 tokens), for the single-purpose benchmarks that measure one piece of it."""
    parser.add_argument("--model", default="base")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--source-len", type=int, default=256)
    parser.add_argument("--target-len", type=int, default=64)


def shape_spec(args) -> "BenchSpec":
    """The BenchSpec of `add_shape_arguments`' parsed values (every other field at its default)."""
    return BenchSpec(model=args.model, batch=args.batch, source_len=args.source_len, target_len=args.target_len)


def leaf_values(path: tuple[str, ...], shape: tuple[int, ...], seed: int, init_std: float = 0.02) -> np.ndarray:
    """The float32 values of the parameter at Flax `path` (Flax layout: kernels (in, out)). They depend only on
    (seed, path, shape), so JAX and PyTorch, each enumerating its own parameters in its own order, get the same
    weights. BART's init: normal(init_std) for kernels and embeddings, LayerNorm scale 1, every bias 0."""
    leaf = path[-1]
    if leaf == "scale":
        return np.ones(shape, np.float32)
    if leaf in ("kernel", "embedding"):
        rng = np.random.default_rng([seed, zlib.crc32("/".join(path).encode())])
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(init_std)
    return np.zeros(shape, np.float32)


def random_leaves(shapes: Mapping[tuple[str, ...], tuple[int, ...]], seed: int, init_std: float = 0.02
                  ) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """Yields (Flax path, values) for each entry of `shapes`, one at a time, so a consumer that converts and drops
    each leaf never holds two copies of the model."""
    for path, shape in sorted(shapes.items()):
        yield path, leaf_values(path, tuple(shape), seed, init_std)


def make_batch(spec: BenchSpec) -> dict[str, np.ndarray]:
    """The seeded training batch, int32: input_ids / attention_mask (B, S), decoder_input_ids / labels (B, T).

    Tokens are uniform over [5, vocab) (no special ids, no padding); decoder_input_ids are labels shifted right
    behind decoder_start_token_id, as BART trains."""
    fields = spec.model_fields()
    rng = np.random.default_rng([spec.seed, 1])
    input_ids = rng.integers(5, fields["vocab_size"], (spec.batch, spec.source_len), dtype=np.int32)
    labels = rng.integers(5, fields["vocab_size"], (spec.batch, spec.target_len), dtype=np.int32)
    start = np.full((spec.batch, 1), fields["decoder_start_token_id"], np.int32)
    return {
        "input_ids": input_ids,
        "attention_mask": np.ones_like(input_ids),
        "decoder_input_ids": np.concatenate([start, labels[:, :-1]], axis=1),
        "labels": labels,
    }


# ---------------------------------------------------------------- timing


def time_train_steps(one_step: Callable[[], Any], steps: int, warmup: int, phase, around_first=None):
    """The one timing protocol every framework's training step goes through, so rows compare like for like: the
    first step (inside `around_first`, e.g. JAX's compile-time listener), `warmup - 1` more untimed steps, then
    `steps` timed ones in a new memory phase.

    Returns (first step s, median s, timed s, steady memory phase, what `around_first` yielded or None)."""
    from bench.memory import start_phase

    from lora_jax.training.runtime import release_host_memory

    with around_first if around_first is not None else contextlib.nullcontext() as entered:
        t0 = time.perf_counter()
        one_step()
        first = time.perf_counter() - t0
    release_host_memory()  # as `python -m train` does after a compilation; a no-op for eager PyTorch's heap
    for _ in range(max(warmup - 1, 0)):
        one_step()
    steady = start_phase(phase)
    median, times = median_time(one_step, steps)
    return first, median, times, steady, entered


def time_generate(run: Callable[[], np.ndarray], spec: "BenchSpec", around_first=None) -> dict[str, Any]:
    """The one generation protocol both frameworks go through: a first call (inside `around_first`, e.g. JAX's
    compile-time listener), then the median of `spec.gen_repeats` calls. `run` returns the ids as numpy.

    Returns the timing fields of a generate record; `compile_s` is the sum of what `around_first` yielded, or None
    (eager frameworks). Memory fields are the caller's (each framework reads its own device peak)."""
    with around_first if around_first is not None else contextlib.nullcontext() as entered:
        t0 = time.perf_counter()
        ids = run()
        first = time.perf_counter() - t0
    median, times = median_time(run, spec.gen_repeats)
    return {
        "kind": "generate", "num_beams": spec.num_beams, "new_tokens": spec.new_tokens, "time_s": median,
        "times_s": times, "first_call_s": first, "compile_s": None if entered is None else sum(entered),
        "tokens_per_s": spec.batch * spec.new_tokens / median, "ids_shape": list(ids.shape),
        "ids_digest": ids_digest(ids),
    }


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 0) -> tuple[float, list[float]]:
    """(median seconds, all timed seconds) of `fn()` over `repeats` calls after `warmup` untimed ones. `fn` must
    block until its work is done (block_until_ready / a host copy)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def interleaved_median_times(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per entry of `fns`, timed round-robin (a, b, c, a, b, c, ...) so slow drifts of a shared
    machine hit every entry alike; compare entries with each other, not with other runs."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------- output


def emit(record: dict[str, Any], path: str | None) -> None:
    """Appends one JSON line to `path` (the runner's result file), or prints it when run by hand."""
    line = json.dumps(record, sort_keys=False, default=_json_default)
    if path is None:
        print(line, flush=True)
        return
    with open(path, "a") as f:
        f.write(line + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def ids_digest(ids: np.ndarray) -> str:
    """A short hash of generated ids (int32), to check that two frameworks produced the same sequences."""
    return format(zlib.crc32(np.ascontiguousarray(ids, np.int32).tobytes()), "08x")


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
