"""Greedy and beam-search generation for encoder-decoder models, jitted, with a key/value cache.

Each call runs one compiled program per (shapes, settings): the encoder once, the cross-attention keys/values once,
then a `lax.while_loop` that decodes one token per iteration for every hypothesis and stops as soon as every
sequence is finished. Scoring follows transformers' (4.57) PyTorch `generate` exactly: log-softmax, then the logits
processors (no-repeat n-gram, min length, forced BOS / EOS), then the beam bookkeeping (running vs finished beams,
length penalty, early-stopping heuristic), so outputs match token for token.

Output ids are laid out as transformers returns them: `decoder_start_token_id` first, `pad_token_id` after `</s>`,
trimmed on the host to the longest returned sequence.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

NEG = -1.0e9  # transformers' "very negative" score for impossible beams


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings (names and meanings as in `transformers.GenerationConfig`).

    max_new_tokens excludes the decoder start token; min_length and max_length count it."""

    num_beams: int = 1
    max_new_tokens: int | None = None
    max_length: int = 20
    min_length: int = 0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    early_stopping: bool | str = False
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    decoder_start_token_id: int = 2
    eos_token_id: int = 2
    pad_token_id: int = 1

    @property
    def total_length(self) -> int:
        """Length of the output buffer, start token included."""
        return self.max_new_tokens + 1 if self.max_new_tokens is not None else self.max_length

    def replace(self, **changes: Any) -> "GenerationConfig":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GenerationConfig":
        # An explicit None switches an optional setting off (forced tokens, max_new_tokens); elsewhere it means unset.
        optional = {"max_new_tokens", "forced_bos_token_id", "forced_eos_token_id"}
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and (v is not None or k in optional)})


def load_generation_config(directory: str) -> GenerationConfig:
    """Settings from a checkpoint directory: `generation_config.json` wins over `config.json`, which wins over
    transformers' defaults (the merge transformers does)."""
    merged: dict[str, Any] = {}
    for name in ("config.json", "generation_config.json"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            with open(path) as f:
                merged.update({k: v for k, v in json.load(f).items() if v is not None})
    return GenerationConfig.from_dict(merged)


def config_from_model(model_config) -> GenerationConfig:
    """Defaults from a BartConfig (its generation fields and special tokens)."""
    return GenerationConfig.from_dict({f.name: getattr(model_config, f.name) for f in dataclasses.fields(GenerationConfig) if hasattr(model_config, f.name)})


# ----------------------------------------------------------------------------------------------------------------
# Logits processors: (N, V) scores, (N, L) sequences whose first `cur_len` entries are filled.


def _no_repeat_ngram_mask(sequences: jax.Array, cur_len: jax.Array, n: int, vocab: int) -> jax.Array:
    """(N, V) True where emitting the token would repeat an n-gram already in sequences[:, :cur_len]."""
    num, length = sequences.shape
    prefix_start = cur_len - (n - 1)
    prefix = jax.lax.dynamic_slice_in_dim(sequences, jnp.maximum(prefix_start, 0), n - 1, axis=1)  # (N, n-1)
    starts = jnp.arange(length - n + 1)
    windows = jnp.stack([sequences[:, j : j + length - n + 1] for j in range(n)], axis=-1)  # (N, W, n)
    hit = jnp.all(windows[:, :, : n - 1] == prefix[:, None, :], axis=-1) & (starts[None, :] + n <= cur_len)
    hit = hit & (cur_len + 1 >= n)
    rows = jnp.broadcast_to(jnp.arange(num)[:, None], hit.shape)
    return jnp.zeros((num, vocab), bool).at[rows, windows[:, :, n - 1]].max(hit)


def _force(scores: jax.Array, token: int, when: jax.Array) -> jax.Array:
    forced = jnp.full_like(scores, -jnp.inf).at[:, token].set(0.0)
    return jnp.where(when, forced, scores)


def process_scores(scores: jax.Array, sequences: jax.Array, cur_len: jax.Array, cfg: GenerationConfig) -> jax.Array:
    """Applies transformers' processors for these settings, in transformers' order."""
    vocab = scores.shape[-1]
    if cfg.no_repeat_ngram_size > 0:
        scores = jnp.where(_no_repeat_ngram_mask(sequences, cur_len, cfg.no_repeat_ngram_size, vocab), -jnp.inf, scores)
    if cfg.min_length > 0:
        scores = jnp.where((cur_len < cfg.min_length) & (jnp.arange(vocab) == cfg.eos_token_id), -jnp.inf, scores)
    if cfg.forced_bos_token_id is not None:
        scores = _force(scores, cfg.forced_bos_token_id, cur_len == 1)
    if cfg.forced_eos_token_id is not None:
        scores = _force(scores, cfg.forced_eos_token_id, cur_len == cfg.total_length - 1)
    return scores


# ----------------------------------------------------------------------------------------------------------------


def _encode_and_cache(model, params, input_ids, attention_mask, expand: int, length: int):
    variables = {"params": params}
    encoded = model.apply(variables, input_ids, attention_mask, method="encode")
    if expand > 1:
        encoded = jnp.repeat(encoded, expand, axis=0)
        attention_mask = jnp.repeat(attention_mask, expand, axis=0)
    cache = model.apply(variables, encoded, length, method="init_cache")
    return attention_mask, cache


def _step_logits(model, params, tokens, attention_mask, cache):
    logits, cache = model.apply({"params": params}, tokens[:, None], None, attention_mask, cache=cache, method="decode")
    return logits[:, -1, :].astype(jnp.float32), cache


def _greedy(model, cfg: GenerationConfig, params, input_ids, attention_mask):
    batch = input_ids.shape[0]
    length = cfg.total_length
    mask, cache = _encode_and_cache(model, params, input_ids, attention_mask, 1, length)
    sequences = jnp.full((batch, length), cfg.pad_token_id, jnp.int32).at[:, 0].set(cfg.decoder_start_token_id)

    def cond(state):
        cur_len, _, _, finished = state
        return (cur_len < length) & ~jnp.all(finished)

    def body(state):
        cur_len, sequences, cache, finished = state
        logits, cache = _step_logits(model, params, sequences[:, cur_len - 1], mask, cache)
        scores = process_scores(logits, sequences, cur_len, cfg)
        tokens = jnp.where(finished, cfg.pad_token_id, jnp.argmax(scores, axis=-1).astype(jnp.int32))
        sequences = sequences.at[:, cur_len].set(tokens)
        return cur_len + 1, sequences, cache, finished | (tokens == cfg.eos_token_id)

    init = (jnp.array(1, jnp.int32), sequences, cache, jnp.zeros((batch,), bool))
    cur_len, sequences, _, _ = jax.lax.while_loop(cond, body, init)
    return sequences, cur_len


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
    """x (B, K, ...) gathered along axis 1 with index (B, K')."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _reorder_cache(cache, flat_index: jax.Array):
    """Reorders the self-attention cache by hypothesis; cross-attention K/V are equal within a batch row, so they
    stay."""
    return [
        {"self": {"k": c["self"]["k"][flat_index], "v": c["self"]["v"][flat_index], "index": c["self"]["index"]}, "cross": c["cross"]}
        for c in cache
    ]


def _beam_search(model, cfg: GenerationConfig, params, input_ids, attention_mask):
    batch, beams = input_ids.shape[0], cfg.num_beams
    length, prompt_len = cfg.total_length, 1
    keep = 2 * beams  # max(2, 1 + number of eos tokens) * num_beams
    mask, cache = _encode_and_cache(model, params, input_ids, attention_mask, beams, length)
    running = jnp.full((batch, beams, length), cfg.pad_token_id, jnp.int32).at[:, :, 0].set(cfg.decoder_start_token_id)
    state = dict(
        cur_len=jnp.array(1, jnp.int32),
        running=running,
        running_scores=jnp.zeros((batch, beams)).at[:, 1:].set(NEG),
        sequences=running,
        scores=jnp.full((batch, beams), NEG),
        finished=jnp.zeros((batch, beams), bool),
        improvable=jnp.ones((batch, 1), bool),
        all_stopped=jnp.array(False),
        cache=cache,
    )
    top_beam_mask = jnp.arange(keep) < beams
    lp = cfg.length_penalty

    def cond(s):
        open_beam = ~(jnp.all(s["finished"]) & (cfg.early_stopping is True))
        return (s["cur_len"] < length) & jnp.any(s["improvable"]) & open_beam & ~s["all_stopped"]

    def body(s):
        cur_len = s["cur_len"]
        flat_running = s["running"].reshape(batch * beams, length)
        logits, cache = _step_logits(model, params, flat_running[:, cur_len - 1], mask, s["cache"])
        log_probs = process_scores(jax.nn.log_softmax(logits, axis=-1), flat_running, cur_len, cfg)
        vocab = log_probs.shape[-1]
        log_probs = log_probs.reshape(batch, beams, vocab) + s["running_scores"][:, :, None]
        topk_scores, topk_index = jax.lax.top_k(log_probs.reshape(batch, beams * vocab), keep)
        source_beam, tokens = topk_index // vocab, (topk_index % vocab).astype(jnp.int32)
        topk_seqs = _gather(s["running"], source_beam).at[:, :, cur_len].set(tokens)
        hits_stop = (tokens == cfg.eos_token_id) | (cur_len + 1 >= length)

        # Running beams for the next step: the best `beams` candidates that did not stop.
        running_candidates = topk_scores + hits_stop * NEG
        next_index = jax.lax.top_k(running_candidates, beams)[1]
        running = _gather(topk_seqs, next_index)
        running_scores = _gather(running_candidates, next_index)
        cache = _reorder_cache(cache, (jnp.arange(batch)[:, None] * beams + _gather(source_beam, next_index)).reshape(-1))

        # Finished beams: merge the candidates that just stopped (among the top `beams`) into the kept ones.
        just_finished = hits_stop & top_beam_mask[None, :]
        final_scores = topk_scores / ((cur_len + 1 - prompt_len) ** lp)
        full = jnp.all(s["finished"], axis=-1, keepdims=True) & (cfg.early_stopping is True)
        final_scores = final_scores + full * NEG + (~s["improvable"]) * NEG + (~just_finished) * NEG
        merged_scores = jnp.concatenate([s["scores"], final_scores], axis=1)
        best = jax.lax.top_k(merged_scores, beams)[1]
        sequences = _gather(jnp.concatenate([s["sequences"], topk_seqs], axis=1), best)
        scores = _gather(merged_scores, best)
        finished = _gather(jnp.concatenate([s["finished"], just_finished], axis=1), best)

        cur_len = cur_len + 1
        if cfg.early_stopping == "never" and lp > 0.0:
            best_length = length - prompt_len
        else:
            best_length = cur_len - prompt_len
        best_running = running_scores[:, :1] / (best_length**lp)
        worst_finished = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), NEG)
        improvable = s["improvable"] & jnp.any(best_running > worst_finished, axis=-1, keepdims=True)
        return dict(
            cur_len=cur_len, running=running, running_scores=running_scores, sequences=sequences, scores=scores,
            finished=finished, improvable=improvable, all_stopped=jnp.all(hits_stop), cache=cache,
        )

    final = jax.lax.while_loop(cond, body, state)
    return final["sequences"][:, 0, :], final["cur_len"]


def _run(model, cfg: GenerationConfig, params, input_ids, attention_mask):
    if cfg.num_beams == 1:
        return _greedy(model, cfg, params, input_ids, attention_mask)
    return _beam_search(model, cfg, params, input_ids, attention_mask)


_run_jit = jax.jit(_run, static_argnums=(0, 1))


def num_compilations() -> int:
    """How many (model, settings, shapes) combinations `generate` has compiled in this process."""
    return _run_jit._cache_size()


def trim(ids: np.ndarray, cfg: GenerationConfig) -> np.ndarray:
    """Crops the fixed-size output buffer to the longest sequence (up to and including its `</s>`), as transformers
    returns it."""
    generated = ids[:, 1:]
    is_eos = generated == cfg.eos_token_id
    lengths = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, generated.shape[1])
    return ids[:, : 1 + int(lengths.max(initial=0))]


def generate(
    model,
    params,
    input_ids,
    attention_mask,
    *,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    length_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    min_length: int | None = None,
    forced_bos_token_id: int | None = None,
    forced_eos_token_id: int | None = None,
    early_stopping: bool | str | None = None,
    generation_config: GenerationConfig | Mapping[str, Any] | None = None,
    jit: bool = True,
) -> np.ndarray:
    """Generates (B, L) int32 ids for input_ids / attention_mask (B, S).

    model: a BartForConditionalGeneration or a LoraModel around one (anything whose `apply` takes the method names
      "encode", "init_cache", "decode"). Settings left as None come from `generation_config` (a GenerationConfig or a
      dict, e.g. `load_generation_config(checkpoint_dir)`), else from the model's config.
    To switch forced_bos/forced_eos off when the config sets them, pass a generation_config with them None.
    """
    if generation_config is None:
        cfg = config_from_model(model.config)
    elif isinstance(generation_config, GenerationConfig):
        cfg = generation_config
    else:
        cfg = GenerationConfig.from_dict({**dataclasses.asdict(config_from_model(model.config)), **generation_config})
    cfg = cfg.replace(
        num_beams=num_beams, max_new_tokens=max_new_tokens, length_penalty=length_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size, min_length=min_length, forced_bos_token_id=forced_bos_token_id,
        forced_eos_token_id=forced_eos_token_id, early_stopping=early_stopping,
    )
    if cfg.num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {cfg.num_beams}")
    if cfg.total_length > model.config.max_position_embeddings:
        raise ValueError(
            f"generation length {cfg.total_length} exceeds the model's max_position_embeddings "
            f"({model.config.max_position_embeddings}); lower max_new_tokens"
        )
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    fn = _run_jit if jit else _run
    ids, _ = fn(model, cfg, params, input_ids, attention_mask)
    return trim(np.asarray(ids), cfg)
