"""transformers' logits processors for BART generation, on fixed-size buffers so they run inside the jitted loop.

Each takes scores (N, V) and sequences (N, L) whose first `cur_len` entries are filled (the rest is padding); the
encoder-side ones also take the encoder input ids (B, S), row n of the scores belonging to input n // (N // B).
`process_scores` applies them in the order of transformers' `_get_logits_processor` (5.x), with the same float
operations, so greedy and beam search stay token-exact; the sampling warpers live in `warpers.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.generation.config import GenerationConfig
from lora_jax.generation.warpers import warp

PROMPT_LEN = 1  # the decoder prompt is the start token: transformers' `input_ids_seq_length` for BART


def _token_mask(tokens: jax.Array, valid: jax.Array, vocab: int) -> jax.Array:
    """(N, V) True where a token of row n (tokens (N, T), where `valid` (N, T) or (T,)) occurs."""
    rows = jnp.broadcast_to(jnp.arange(tokens.shape[0])[:, None], tokens.shape)
    valid = jnp.broadcast_to(valid, tokens.shape)
    return jnp.zeros((tokens.shape[0], vocab), bool).at[rows, jnp.clip(tokens, 0, vocab - 1)].max(valid)


def _ngram_windows(ids: jax.Array, n: int) -> jax.Array:
    """(R, T) -> (R, T - n + 1, n): every n-gram of each row."""
    count = ids.shape[1] - n + 1
    return jnp.stack([ids[:, j : j + count] for j in range(n)], axis=-1)


def _no_repeat_ngram_mask(sequences: jax.Array, cur_len: jax.Array, n: int, vocab: int) -> jax.Array:
    """(N, V) True where emitting the token would repeat an n-gram already in sequences[:, :cur_len]."""
    num, length = sequences.shape
    if n > length:  # no n-gram fits in the buffer, so none can repeat
        return jnp.zeros((num, vocab), bool)
    prefix = jax.lax.dynamic_slice_in_dim(sequences, jnp.maximum(cur_len - (n - 1), 0), n - 1, axis=1)  # (N, n-1)
    windows = _ngram_windows(sequences, n)  # (N, W, n)
    starts = jnp.arange(windows.shape[1])
    hit = jnp.all(windows[:, :, : n - 1] == prefix[:, None, :], axis=-1) & (starts[None, :] + n <= cur_len)
    return _token_mask(windows[:, :, n - 1], hit & (cur_len + 1 >= n), vocab)


def _encoder_no_repeat_ngram_mask(sequences, cur_len, encoder_ids, n: int, vocab: int) -> jax.Array:
    """(N, V) True where the token would complete an n-gram of the row's encoder input (padding included, as
    transformers builds them from the padded `input_ids`) after the last n-1 generated tokens."""
    num = sequences.shape[0]
    if n > encoder_ids.shape[1]:
        return jnp.zeros((num, vocab), bool)
    windows = jnp.repeat(_ngram_windows(encoder_ids, n), num // encoder_ids.shape[0], axis=0)  # (N, W, n)
    prefix = jax.lax.dynamic_slice_in_dim(sequences, jnp.maximum(cur_len - (n - 1), 0), n - 1, axis=1)
    hit = jnp.all(windows[:, :, : n - 1] == prefix[:, None, :], axis=-1) & (cur_len >= n - 1)
    return _token_mask(windows[:, :, n - 1], hit, vocab)


def _penalise(scores: jax.Array, mask: jax.Array, penalty: float) -> jax.Array:
    """transformers' repetition rule on the masked tokens: negative scores times `penalty`, others divided by it."""
    return jnp.where(mask, jnp.where(scores < 0, scores * penalty, scores / penalty), scores)


def _sequence_bias(scores, sequences, cur_len, biases: tuple) -> jax.Array:
    """transformers' SequenceBiasLogitsProcessor: a bias vector built as it builds it (single tokens first, then
    the longer sequences grouped by prefix length, each added where the sequence's prefix ends the row)."""
    vocab = scores.shape[-1]
    table = dict(biases)  # later duplicates win, as in transformers' dict
    bad = [t for ids in table for t in ids if t >= vocab]
    if bad:
        raise ValueError(f"sequence_bias / bad_words_ids name tokens {bad} outside the vocabulary ({vocab})")
    single = np.zeros(vocab, np.float32)
    for ids, bias in table.items():
        if len(ids) == 1:
            single[ids[0]] = bias
    bias = jnp.zeros_like(scores) + jnp.asarray(single).astype(scores.dtype)
    groups: dict[int, list] = {}
    for ids, value in table.items():
        if len(ids) > 1:
            groups.setdefault(len(ids) - 1, []).append((ids, value))
    for prefix_len, group in groups.items():
        if prefix_len > sequences.shape[1]:
            continue
        prefixes = jnp.asarray([ids[:-1] for ids, _ in group], jnp.int32)  # (G, P)
        last = jnp.asarray([ids[-1] for ids, _ in group], jnp.int32)
        values = jnp.asarray(np.array([v for _, v in group], np.float32)).astype(scores.dtype)
        tail = jax.lax.dynamic_slice_in_dim(sequences, jnp.maximum(cur_len - prefix_len, 0), prefix_len, axis=1)
        matching = jnp.all(tail[:, None, :] == prefixes[None], axis=-1) & (cur_len >= prefix_len)  # (N, G)
        for g in range(len(group)):  # index_add_ adds the group's entries one by one
            bias = bias.at[:, last[g]].add(jnp.where(matching[:, g], values[g], 0.0))
    return scores + bias


def bad_words_bias(cfg: GenerationConfig) -> tuple:
    """NoBadWordsLogitsProcessor as a sequence bias: -inf for each bad sequence, except single eos tokens."""
    words = [w for w in cfg.bad_words_ids if all(list(w) != [e] for e in cfg.eos_ids)]
    return tuple((tuple(w), float("-inf")) for w in words)


def _only(scores: jax.Array, tokens, when: jax.Array) -> jax.Array:
    """Every score -inf except `tokens` (0), where `when`."""
    forced = jnp.full_like(scores, -jnp.inf).at[:, jnp.asarray(tokens)].set(0.0)
    return jnp.where(when, forced, scores)


def _ban(scores: jax.Array, tokens, when) -> jax.Array:
    banned = jnp.isin(jnp.arange(scores.shape[-1]), jnp.asarray(tokens))
    return jnp.where(banned & when, -jnp.inf, scores)


def _remove_invalid(scores: jax.Array) -> jax.Array:
    info = jnp.finfo(scores.dtype)
    out = jnp.where(jnp.isnan(scores), 0.0, scores)
    out = jnp.where(scores == jnp.inf, info.max, out)
    return jnp.where(scores == -jnp.inf, info.min, out)


def _exponential_decay(scores, cur_len, cfg: GenerationConfig) -> jax.Array:
    """transformers' ExponentialDecayLengthPenalty: eos scores raised by |score| * (factor ** i - 1), i steps past
    the start; the factors are powers of a Python float, rounded once to the scores' dtype as torch rounds them."""
    start, factor = cfg.exponential_decay_length_penalty
    start += PROMPT_LEN
    table = np.array([factor ** i - 1 for i in range(cfg.total_length + 1)], np.float64)
    scale = jnp.asarray(table.astype(np.dtype(scores.dtype)))[jnp.maximum(cur_len - start, 0)]
    eos = jnp.asarray(cfg.eos_ids)
    eos_scores = scores[:, eos]
    penalty = jnp.where(jnp.isfinite(eos_scores), jnp.abs(eos_scores) * scale, 0.0)
    penalties = jnp.zeros_like(scores).at[:, eos].set(penalty)
    return jnp.where(cur_len > start, scores + penalties, scores)


def min_length(cfg: GenerationConfig) -> int:
    """The total length before which eos is banned: min_new_tokens, when set, wins over min_length (transformers
    overwrites min_length with min_new_tokens + prompt length)."""
    return cfg.min_new_tokens + PROMPT_LEN if cfg.min_new_tokens is not None else cfg.min_length


def process_scores(scores: jax.Array, sequences: jax.Array, cur_len: jax.Array, cfg: GenerationConfig,
                   encoder_ids: jax.Array | None = None, num_beams: int = 1,
                   diversity: jax.Array | None = None) -> jax.Array:
    """Applies transformers' processors (and, when sampling, its warpers) for these settings, in transformers'
    order. scores (N, V); sequences (N, L); encoder_ids (B, S), needed by the encoder-side processors.
    num_beams: beams per input (the warpers keep len(eos) + 1 tokens in beam sampling).
    diversity (N, V): group beam search's Hamming penalty (diversity_penalty * how often earlier groups chose each
    token at this step), subtracted where transformers' HammingDiversityLogitsProcessor sits: after sequence_bias."""
    vocab = scores.shape[-1]
    if cfg.sequence_bias is not None:
        scores = _sequence_bias(scores, sequences, cur_len, cfg.sequence_bias)
    if diversity is not None:
        scores = scores - diversity
    if cfg.encoder_repetition_penalty != 1.0 and encoder_ids is not None:
        rows = jnp.repeat(encoder_ids, scores.shape[0] // encoder_ids.shape[0], axis=0)
        scores = _penalise(scores, _token_mask(rows, jnp.array(True), vocab), 1 / cfg.encoder_repetition_penalty)
    if cfg.repetition_penalty != 1.0:
        seen = _token_mask(sequences, jnp.arange(sequences.shape[1]) < cur_len, vocab)
        scores = _penalise(scores, seen, cfg.repetition_penalty)
    if cfg.no_repeat_ngram_size > 0:
        scores = jnp.where(_no_repeat_ngram_mask(sequences, cur_len, cfg.no_repeat_ngram_size, vocab), -jnp.inf, scores)
    if cfg.encoder_no_repeat_ngram_size > 0 and encoder_ids is not None:
        banned = _encoder_no_repeat_ngram_mask(sequences, cur_len, encoder_ids, cfg.encoder_no_repeat_ngram_size, vocab)
        scores = jnp.where(banned, -jnp.inf, scores)
    if cfg.bad_words_ids is not None and bad_words_bias(cfg):
        scores = _sequence_bias(scores, sequences, cur_len, bad_words_bias(cfg))
    if min_length(cfg) > 0:
        scores = _ban(scores, cfg.eos_ids, cur_len < min_length(cfg))
    if cfg.forced_bos_token_id is not None:
        scores = _only(scores, cfg.forced_bos_token_id, cur_len == 1)
    if cfg.forced_eos_token_id is not None:
        scores = _only(scores, cfg.forced_eos_token_id, cur_len == cfg.total_length - 1)
    if cfg.remove_invalid_values:
        scores = _remove_invalid(scores)
    if cfg.exponential_decay_length_penalty is not None:
        scores = _exponential_decay(scores, cur_len, cfg)
    if cfg.suppress_tokens:
        scores = _ban(scores, cfg.suppress_tokens, True)
    if cfg.begin_suppress_tokens:
        begin = PROMPT_LEN + (1 if cfg.forced_bos_token_id is not None else 0)
        scores = _ban(scores, cfg.begin_suppress_tokens, cur_len == begin)
    if cfg.do_sample:
        scores = warp(scores, cfg, keep=len(cfg.eos_ids) + 1 if num_beams > 1 else 1)
    if cfg.renormalize_logits:
        scores = jax.nn.log_softmax(scores, axis=-1)
    return scores
