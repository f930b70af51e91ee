"""Group (diverse) beam search: `num_beam_groups` groups of num_beams / num_beam_groups beams, each its own beam search,
with transformers' Hamming diversity penalty, in one `lax.while_loop`.

Follows transformers 4.55's `_group_beam_search` (the last release with it in core; 5.x moved it to a hub
repository) and the `BeamSearchScorer` / `BeamHypotheses` it uses, which differ from the vectorised beam search of
`search.py`: within a step the groups run in order, and group g's scores lose diversity_penalty * (how many beams of
groups < g chose the token at this step, for the same input) right after sequence_bias; each (input, group) keeps its
own best finished hypotheses and its own "done" flag (checked against the best candidate, eos ones included); at
max_length the running beams of unfinished groups join their hypotheses; the n best hypotheses of all groups of an
input are returned, best first; a finished hypothesis ends in the first eos id (transformers appends eos_token_id[0]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lora_jax.generation.config import GenerationConfig
from lora_jax.generation.decoder_steps import (NEG, encode_and_cache, gather, length_penalty_table, reorder_cache,
                                               step_logits)
from lora_jax.generation.processors import PROMPT_LEN, process_scores


def _best(valid: jax.Array, scores: jax.Array, k: int) -> jax.Array:
    """(..., M) -> indices (..., k) of the k best valid entries, best first; on ties the lower index first (as
    BeamHypotheses keeps an earlier hypothesis over an equal later one). Invalid entries come last."""
    iota = jnp.broadcast_to(jnp.arange(scores.shape[-1]), scores.shape)
    _, _, order = jax.lax.sort((~valid, -scores, iota), dimension=-1, is_stable=True, num_keys=2)
    return order[..., :k]


def _keep_best(hyps: dict, g: int, add: jax.Array, seqs: jax.Array, scores: jax.Array) -> dict:
    """Group g's hypotheses (B, size, ...) with the candidates where `add` (B, M) merged in: the `size` best."""
    size = hyps["scores"].shape[2]
    valid = jnp.concatenate([hyps["valid"][:, g], add], axis=1)
    all_scores = jnp.concatenate([hyps["scores"][:, g], jnp.where(add, scores, -jnp.inf)], axis=1)
    best = _best(valid, all_scores, size)
    merged = dict(valid=gather(valid, best), scores=gather(all_scores, best),
                  seqs=gather(jnp.concatenate([hyps["seqs"][:, g], seqs], axis=1), best))
    return {k: hyps[k].at[:, g].set(merged[k]) for k in hyps}


def _is_done(cfg: GenerationConfig, hyps: dict, g: int, best_candidate, denominator, max_denominator) -> jax.Array:
    """(B,): BeamHypotheses.is_done for group g: `size` hypotheses, and (unless early_stopping=True) none of the
    running beams can beat the worst of them (the best candidate, length-normalised)."""
    valid, scores = hyps["valid"][:, g], hyps["scores"][:, g]
    full = jnp.all(valid, axis=1)
    if cfg.early_stopping is True:
        return full
    worst = jnp.min(jnp.where(valid, scores, jnp.inf), axis=1)
    never = cfg.early_stopping == "never" and cfg.length_penalty > 0.0
    return full & (worst >= best_candidate / (max_denominator if never else denominator))


def _group_step(cfg: GenerationConfig, s: dict, log_probs, g: int, chosen, input_ids, penalty) -> tuple:
    """Group g's beam search step: log_probs (B, K, V); chosen (B, K) this step's tokens of groups < g.
    Returns the state with group g's hypotheses / done flags updated, and group g's (B, size) next tokens,
    scores and source beams (within the group)."""
    batch, beams, vocab = log_probs.shape
    size, cur_len, length = beams // cfg.num_beam_groups, s["cur_len"], cfg.total_length
    lo = g * size
    seqs = s["running"][:, lo : lo + size]  # (B, size, L)
    diversity = None
    if g > 0:  # transformers' bincount of the earlier groups' tokens, times the penalty, for each of the group's rows
        rows = jnp.broadcast_to(jnp.arange(batch)[:, None], (batch, lo))
        counts = jnp.zeros((batch, vocab), jnp.float32).at[rows, chosen[:, :lo]].add(1.0)
        diversity = jnp.repeat(jnp.float32(cfg.diversity_penalty) * counts, size, axis=0)
    processed = process_scores(log_probs[:, lo : lo + size].reshape(batch * size, vocab),
                               seqs.reshape(batch * size, length), cur_len, cfg, input_ids, size, diversity)
    scores = processed.reshape(batch, size, vocab) + s["running_scores"][:, lo : lo + size, None]
    keep = max(2, 1 + len(cfg.eos_ids)) * size
    top_scores, top_index = jax.lax.top_k(scores.reshape(batch, size * vocab), keep)
    source, tokens = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    is_eos = jnp.isin(tokens, jnp.asarray(cfg.eos_ids, jnp.int32))
    done = s["done"][:, g : g + 1]

    # An eos candidate among the first `size` becomes a hypothesis (ending in eos_token_id[0], as transformers
    # writes it), the first `size` others run on.
    add = is_eos[:, :size] & ~done
    finished = gather(seqs, source[:, :size]).at[:, :, cur_len].set(cfg.eos_ids[0])
    hyps = _keep_best(s["hyps"], g, add, finished, top_scores[:, :size] / penalty[cur_len + 1 - PROMPT_LEN])
    group_done = done[:, 0] | _is_done(cfg, hyps, g, top_scores[:, 0], penalty[cur_len + 1 - PROMPT_LEN],
                                       penalty[length - PROMPT_LEN])
    rank = jnp.arange(keep, dtype=jnp.float32)
    next_index = jax.lax.top_k(jnp.where(is_eos, -2.0 * keep, -rank), size)[1]
    # a done group runs on pad tokens with score 0 (transformers' scorer); its beams no longer matter
    next_tokens = jnp.where(done, cfg.pad_token_id, gather(tokens, next_index))
    next_scores = jnp.where(done, 0.0, gather(top_scores, next_index))
    next_source = jnp.where(done, 0, gather(source, next_index))
    return {**s, "hyps": hyps, "done": s["done"].at[:, g].set(group_done)}, next_tokens, next_scores, next_source


def _finalize(cfg: GenerationConfig, s: dict, penalty) -> jax.Array:
    """Running beams of groups not done join their hypotheses; -> (B, n, L) the n best of each input, best first."""
    batch, beams, length = s["running"].shape
    groups, size = cfg.num_beam_groups, beams // cfg.num_beam_groups
    hyps = s["hyps"]
    for g in range(groups):
        lo = g * size
        add = jnp.broadcast_to(~s["done"][:, g : g + 1], (batch, size))
        scores = s["running_scores"][:, lo : lo + size] / penalty[s["cur_len"] - PROMPT_LEN]
        hyps = _keep_best(hyps, g, add, s["running"][:, lo : lo + size], scores)
    flat = {k: v.reshape((batch, groups * size) + v.shape[3:]) for k, v in hyps.items()}
    best = _best(flat["valid"], flat["scores"], cfg.num_return_sequences)
    return gather(flat["seqs"], best)


def _group_start(cfg: GenerationConfig, batch: int, cache) -> dict:
    beams, groups, length = cfg.num_beams, cfg.num_beam_groups, cfg.total_length
    size = beams // groups
    running = jnp.full((batch, beams, length), cfg.pad_token_id, jnp.int32).at[:, :, 0].set(cfg.decoder_start_token_id)
    return dict(
        cur_len=jnp.array(1, jnp.int32),
        running=running,
        # the first beam of each group is live, so a group's identical start beams do not repeat one continuation
        running_scores=jnp.full((batch, beams), NEG, jnp.float32).at[:, ::size].set(0.0),
        hyps=dict(seqs=jnp.full((batch, groups, size, length), cfg.pad_token_id, jnp.int32),
                  scores=jnp.full((batch, groups, size), -jnp.inf, jnp.float32),
                  valid=jnp.zeros((batch, groups, size), bool)),
        done=jnp.zeros((batch, groups), bool),
        cache=cache,
    )


def group_beam_search(model, cfg: GenerationConfig, params, input_ids, attention_mask):
    """-> (ids (B * num_return_sequences, L) int32, the decoded length). input_ids / attention_mask (B, S)."""
    batch, beams, length = input_ids.shape[0], cfg.num_beams, cfg.total_length
    size = beams // cfg.num_beam_groups
    penalty = length_penalty_table(length, cfg.length_penalty)
    state = _group_start(cfg, batch, encode_and_cache(model, params, input_ids, attention_mask, beams, length))

    def cond(s):
        return (s["cur_len"] < length) & ~jnp.all(s["done"])

    def body(s):
        cur_len = s["cur_len"]
        flat_running = s["running"].reshape(batch * beams, length)
        logits, cache = step_logits(model, params, flat_running[:, cur_len - 1], attention_mask, s["cache"])
        log_probs = jax.nn.log_softmax(logits, axis=-1).reshape(batch, beams, -1)
        chosen = jnp.zeros((batch, beams), jnp.int32)
        scores = jnp.zeros((batch, beams), jnp.float32)
        source = jnp.zeros((batch, beams), jnp.int32)
        for g in range(cfg.num_beam_groups):  # in order: group g is penalised for the tokens groups < g chose
            s, tokens, group_scores, group_source = _group_step(cfg, s, log_probs, g, chosen, input_ids, penalty)
            chosen = chosen.at[:, g * size : (g + 1) * size].set(tokens)
            scores = scores.at[:, g * size : (g + 1) * size].set(group_scores)
            source = source.at[:, g * size : (g + 1) * size].set(group_source + g * size)
        running = gather(s["running"], source).at[:, :, cur_len].set(chosen)
        flat_source = (jnp.arange(batch)[:, None] * beams + source).reshape(-1)
        return {**s, "cur_len": cur_len + 1, "running": running, "running_scores": scores,
                "cache": reorder_cache(cache, flat_source)}

    final = jax.lax.while_loop(cond, body, state)
    best = _finalize(cfg, final, penalty)
    return best.reshape(batch * cfg.num_return_sequences, length), final["cur_len"]
