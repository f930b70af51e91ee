"""The jitted decoding loops: greedy and beam search over a key/value cache, one `lax.while_loop` each.

The encoder runs once and `init_cache` computes the cross-attention keys/values once; every loop iteration decodes
one token per hypothesis and the loop stops as soon as every sequence is finished. Beam bookkeeping follows
transformers' (4.57) vectorised `_beam_search`: 2K candidates per input, running vs finished beams, length
penalty, early-stopping heuristic. Group (diverse) beam search is in `group_search.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.training import compile_events
from lora_jax.generation.config import GenerationConfig
from lora_jax.generation.decoder_steps import (NEG, encode_and_cache, gather, length_penalty_table, reorder_cache,
                                               step_logits)
from lora_jax.generation.group_search import group_beam_search
from lora_jax.generation.processors import process_scores


def _greedy(model, cfg: GenerationConfig, params, input_ids, attention_mask, key):
    """Greedy search, or multinomial sampling from the processed scores when cfg.do_sample (step t draws with
    fold_in(key, t), one independent draw per row)."""
    batch = input_ids.shape[0]
    length = cfg.total_length
    eos = jnp.asarray(cfg.eos_ids, jnp.int32)
    cache = encode_and_cache(model, params, input_ids, attention_mask, 1, length)
    sequences = jnp.full((batch, length), cfg.pad_token_id, jnp.int32).at[:, 0].set(cfg.decoder_start_token_id)

    def cond(state):
        cur_len, _, _, finished = state
        return (cur_len < length) & ~jnp.all(finished)

    def body(state):
        cur_len, sequences, cache, finished = state
        logits, cache = step_logits(model, params, sequences[:, cur_len - 1], attention_mask, cache)
        scores = process_scores(logits, sequences, cur_len, cfg, input_ids)
        if cfg.do_sample:
            chosen = jax.random.categorical(jax.random.fold_in(key, cur_len), scores, axis=-1)
        else:
            chosen = jnp.argmax(scores, axis=-1)
        tokens = jnp.where(finished, cfg.pad_token_id, chosen.astype(jnp.int32))
        sequences = sequences.at[:, cur_len].set(tokens)
        return cur_len + 1, sequences, cache, finished | jnp.isin(tokens, eos)

    init = (jnp.array(1, jnp.int32), sequences, cache, jnp.zeros((batch,), bool))
    cur_len, sequences, _, _ = jax.lax.while_loop(cond, body, init)
    return sequences, cur_len


def _merge_finished(s: dict, topk_seqs, topk_scores, just_finished, denominator, early_stopping) -> tuple:
    """Keeps the best `beams` of the finished hypotheses so far and the candidates that just finished.

    topk_* (B, 2K); candidates that did not just finish, or arrive once their input can no longer improve, get
    NEG added so they lose to any real finished hypothesis (transformers' `_update_finished_beams`)."""
    beams = s["scores"].shape[1]
    final_scores = topk_scores / denominator
    full = jnp.all(s["finished"], axis=-1, keepdims=True) & (early_stopping is True)
    final_scores = final_scores + full * NEG + (~s["improvable"]) * NEG + (~just_finished) * NEG
    merged_scores = jnp.concatenate([s["scores"], final_scores], axis=1)
    best = jax.lax.top_k(merged_scores, beams)[1]
    sequences = gather(jnp.concatenate([s["sequences"], topk_seqs], axis=1), best)
    finished = gather(jnp.concatenate([s["finished"], just_finished], axis=1), best)
    return sequences, gather(merged_scores, best), finished


def _still_improvable(improvable, running_scores, scores, finished, denominator) -> jax.Array:
    """(B, 1): can the best running beam, length-normalised by `denominator`, still beat the worst finished one?
    (transformers' `_check_early_stop_heuristic`)."""
    best_running = running_scores[:, :1] / denominator
    worst_finished = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), NEG)
    return improvable & jnp.any(best_running > worst_finished, axis=-1, keepdims=True)


def _beam_start(cfg: GenerationConfig, batch: int, cache) -> dict:
    """The beam-search loop state before the first token: (B, K, L) running and finished sequences, their scores."""
    beams, length = cfg.num_beams, cfg.total_length
    running = jnp.full((batch, beams, length), cfg.pad_token_id, jnp.int32).at[:, :, 0].set(cfg.decoder_start_token_id)
    return dict(
        cur_len=jnp.array(1, jnp.int32),
        running=running,
        # Only beam 0 is live at first, so the K identical start beams do not yield K copies of one continuation.
        running_scores=jnp.zeros((batch, beams), jnp.float32).at[:, 1:].set(NEG),
        sequences=running,
        scores=jnp.full((batch, beams), NEG, jnp.float32),
        finished=jnp.zeros((batch, beams), bool),
        improvable=jnp.ones((batch, 1), bool),
        all_stopped=jnp.array(False),
        cache=cache,
    )


def _top_continuations(log_probs, keep: int, cfg: GenerationConfig, key, cur_len):
    """(B, K*V) accumulated log-probs -> the `keep` candidates (scores, flat indices), best first: the top ones, or
    with do_sample `keep` drawn without replacement in proportion to softmax(log_probs) (Gumbel top-k, the
    distribution of transformers' torch.multinomial without replacement), then sorted by score."""
    if not cfg.do_sample:
        return jax.lax.top_k(log_probs, keep)
    noise = jax.random.gumbel(jax.random.fold_in(key, cur_len), log_probs.shape, log_probs.dtype)
    index = jax.lax.top_k(log_probs + noise, keep)[1]
    drawn = jnp.take_along_axis(log_probs, index, axis=1)
    scores, order = jax.lax.top_k(drawn, keep)
    return scores, jnp.take_along_axis(index, order, axis=1)


def _beam_search(model, cfg: GenerationConfig, params, input_ids, attention_mask, key):
    batch, beams = input_ids.shape[0], cfg.num_beams
    length, prompt_len = cfg.total_length, 1
    eos = jnp.asarray(cfg.eos_ids, jnp.int32)
    # enough candidates to keep `beams` running however many of them end in an eos token (transformers' rule)
    keep = max(2, 1 + len(cfg.eos_ids)) * beams
    top_beam_mask = jnp.arange(keep) < beams
    penalty = length_penalty_table(length, cfg.length_penalty)
    state = _beam_start(cfg, batch, encode_and_cache(model, params, input_ids, attention_mask, beams, length))

    def cond(s):
        open_beam = ~(jnp.all(s["finished"]) & (cfg.early_stopping is True))
        return (s["cur_len"] < length) & jnp.any(s["improvable"]) & open_beam & ~s["all_stopped"]

    def body(s):
        cur_len = s["cur_len"]
        flat_running = s["running"].reshape(batch * beams, length)
        logits, cache = step_logits(model, params, flat_running[:, cur_len - 1], attention_mask, s["cache"])
        log_probs = process_scores(jax.nn.log_softmax(logits, axis=-1), flat_running, cur_len, cfg, input_ids, beams)
        vocab = log_probs.shape[-1]
        log_probs = log_probs.reshape(batch, beams, vocab) + s["running_scores"][:, :, None]
        topk_scores, topk_index = _top_continuations(log_probs.reshape(batch, beams * vocab), keep, cfg, key, cur_len)
        source_beam, tokens = topk_index // vocab, (topk_index % vocab).astype(jnp.int32)
        topk_seqs = gather(s["running"], source_beam).at[:, :, cur_len].set(tokens)
        hits_stop = jnp.isin(tokens, eos) | (cur_len + 1 >= length)

        # Running beams for the next step: the best `beams` candidates that did not stop; the cache follows them.
        running_candidates = topk_scores + hits_stop * NEG
        next_index = jax.lax.top_k(running_candidates, beams)[1]
        running_scores = gather(running_candidates, next_index)
        flat_source = jnp.arange(batch)[:, None] * beams + gather(source_beam, next_index)
        cache = reorder_cache(cache, flat_source.reshape(-1))

        just_finished = hits_stop & top_beam_mask[None, :]
        sequences, scores, finished = _merge_finished(
            s, topk_seqs, topk_scores, just_finished, penalty[cur_len + 1 - prompt_len], cfg.early_stopping
        )
        cur_len = cur_len + 1
        # early_stopping="never" with a positive penalty assumes running beams may grow to max_length; otherwise the
        # best a running beam can do is its current normalised score.
        never = cfg.early_stopping == "never" and cfg.length_penalty > 0.0
        best_length = length - prompt_len if never else cur_len - prompt_len
        improvable = _still_improvable(s["improvable"], running_scores, scores, finished, penalty[best_length])
        return dict(
            cur_len=cur_len, running=gather(topk_seqs, next_index), running_scores=running_scores,
            sequences=sequences, scores=scores, finished=finished, improvable=improvable,
            all_stopped=jnp.all(hits_stop), cache=cache,
        )

    final = jax.lax.while_loop(cond, body, state)
    best = final["sequences"][:, : cfg.num_return_sequences, :]  # finished beams are kept sorted, best first
    return best.reshape(batch * cfg.num_return_sequences, length), final["cur_len"]


def with_adapter_ids(model, adapter_ids):
    """Hook for per-example adapters: `model` with its (B,) `adapter_ids` bound (a `MultiLoraModel`'s
    `with_adapter_ids`; it repeats them per beam for the decoder's B * beams rows). None leaves `model` as is."""
    if adapter_ids is None:
        return model
    if not hasattr(model, "with_adapter_ids"):
        raise ValueError(f"adapter_ids need a model that takes them (lora_jax.lora.multi.MultiLoraModel), "
                         f"got {type(model).__name__}")
    return model.with_adapter_ids(adapter_ids)


def _repeat_rows(x, n: int):
    return x if x is None or n == 1 else jnp.repeat(x, n, axis=0)


def decode(model, cfg: GenerationConfig, params, input_ids, attention_mask, adapter_ids=None, key=None):
    """Greedy / sampling (num_beams 1), beam search, beam sampling or group (diverse) beam search ->
    (ids (B * num_return_sequences, cfg.total_length) int32, the decoded length), un-jitted.
    adapter_ids (B,): each input's adapter slot, for a MultiLoraModel (traced: one program whatever the mix).
    key: a PRNG key, used only when cfg.do_sample."""
    if cfg.do_sample and key is None:
        raise ValueError("do_sample=True needs a PRNG key: pass prng_key=jax.random.PRNGKey(seed)")
    if cfg.num_beams == 1 and cfg.num_return_sequences > 1:  # sampling: n independent draws per input
        n = cfg.num_return_sequences
        input_ids, attention_mask, adapter_ids = (_repeat_rows(x, n) for x in (input_ids, attention_mask, adapter_ids))
    model = with_adapter_ids(model, adapter_ids)
    if cfg.num_beams == 1:
        return _greedy(model, cfg, params, input_ids, attention_mask, key)
    if cfg.num_beam_groups > 1:
        return group_beam_search(model, cfg, params, input_ids, attention_mask)
    return _beam_search(model, cfg, params, input_ids, attention_mask, key)


# One compiled program per (model, settings, input shapes): both are hashable frozen dataclasses, so equal settings
# reuse the compiled loop. A name of its own lets `num_compilations` count its compile events.
DECODE_NAME = compile_events.unique_name("lora_jax_decode")


def _decode_to_jit(model, cfg: GenerationConfig, params, input_ids, attention_mask, adapter_ids=None, key=None):
    return decode(model, cfg, params, input_ids, attention_mask, adapter_ids, key)


_decode_to_jit.__name__ = _decode_to_jit.__qualname__ = DECODE_NAME
decode_jit = jax.jit(_decode_to_jit, static_argnums=(0, 1))


def num_compilations() -> int:
    """How many (model, settings, shapes) combinations `generate` has compiled in this process."""
    return compile_events.compilations(DECODE_NAME)
