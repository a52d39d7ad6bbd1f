"""Greedy and beam-search decoding over a step function, jittable, batched, any decoder.

A step is `step(state, tokens (N,), t) → (logits (N, V) float32, state)`: the logits of the token
after `tokens`, which sit at position t. The state is the decoder's KV cache (`cached_step`) or, for
the cache-free reference, the token buffer it reruns causally (`uncached_step`); both give the same
tokens. Every sequence starts with its own first token (a language tag, BOS); after `eos_id` a
sequence emits `pad_id` only. Token ids in `banned` are never generated.

Beam search keeps `beam` hypotheses per example in a batch of B·beam rows (row b·beam + k), ranks
candidates by their summed log-probability (`length_penalty` α > 0 ranks finished hypotheses by
sum / length^α, as GNMT), and reorders the state's rows by the surviving beams. With beam 1 it is
greedy search, token for token.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

State = Any
Step = Callable[[State, jax.Array, jax.Array], tuple[jax.Array, State]]
_NEG = -1e30


def cached_step(decoder_graphdef: nnx.GraphDef, decoder_state: nnx.State, **kwargs) -> Step:
  """The step of an nnx decoder whose caches are the state (`nnx.state(decoder, nnx.Cache)` after
  `decoder.init_cache`): one token per call. kwargs (context, context_mask) go to every call."""
  def step(cache, tokens, t):
    del t  # the cache knows its position
    decoder = nnx.merge(decoder_graphdef, decoder_state, cache)
    logits = decoder(tokens[:, None], **kwargs)[:, 0]
    return logits, nnx.state(decoder, nnx.Cache)
  return step


def uncached_step(decoder: Callable[..., jax.Array], **kwargs) -> Step:
  """The reference step: the state is the (N, T) token buffer; each call writes `tokens` at t and
  reruns the whole buffer causally, reading the logits at t."""
  def step(buffer, tokens, t):
    buffer = jax.lax.dynamic_update_slice_in_dim(buffer, tokens[:, None].astype(buffer.dtype), t, 1)
    logits = decoder(buffer, **kwargs)
    return jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False), buffer
  return step


def _log_probs(logits: jax.Array, banned: Sequence[int]) -> jax.Array:
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  if banned:
    logp = logp.at[:, jnp.asarray(banned)].set(_NEG)
  return logp


def greedy(step: Step, state: State, first: jax.Array, steps: int, *, eos_id: int, pad_id: int,
           banned: Sequence[int] = ()) -> tuple[jax.Array, jax.Array]:
  """first: (B,) → (tokens (B, steps) after `first`, summed log-probability (B,))."""
  b = first.shape[0]

  def body(t, carry):
    state, prev, done, tokens, score = carry
    logits, state = step(state, prev, t)
    logp = _log_probs(logits, banned)
    tok = jnp.argmax(logp, axis=-1).astype(jnp.int32)
    tok = jnp.where(done, pad_id, tok)
    score = score + jnp.where(done, 0.0, jnp.take_along_axis(logp, tok[:, None], 1)[:, 0])
    tokens = tokens.at[:, t].set(tok)
    return state, tok, done | (tok == eos_id), tokens, score

  init = (state, first.astype(jnp.int32), jnp.zeros((b,), bool),
          jnp.full((b, steps), pad_id, jnp.int32), jnp.zeros((b,), jnp.float32))
  _, _, _, tokens, score = jax.lax.fori_loop(0, steps, body, init)
  return tokens, score


def repeat_rows(x: jax.Array, beam: int) -> jax.Array:
  """(B, ...) → (B·beam, ...): each row `beam` times in a row (the layout beam search expects)."""
  return jnp.repeat(x, beam, axis=0)


def _reorder(state: State, rows: jax.Array, n: int) -> State:
  """Every leaf of `state` with n rows, its rows taken in the order `rows` (n,)."""
  return jax.tree.map(lambda x: x[rows] if x.ndim and x.shape[0] == n else x, state)


def beam_search(step: Step, state: State, first: jax.Array, steps: int, *, beam: int,
                eos_id: int, pad_id: int, banned: Sequence[int] = (),
                length_penalty: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """first: (B,); `state` has B·beam rows (`repeat_rows`) → (best tokens (B, steps), its score
  (B,)): the summed log-probability, over length^α when `length_penalty` α > 0."""
  b, k = first.shape[0], beam
  n = b * k

  def body(t, carry):
    state, prev, done, tokens, score, length = carry
    logits, state = step(state, prev, t)
    logp = _log_probs(logits, banned).reshape(b, k, -1)
    v = logp.shape[-1]
    # A finished hypothesis has one continuation, pad, at no cost: it stays in the beam as it is.
    finished = jnp.full((v,), _NEG).at[pad_id].set(0.0)
    logp = jnp.where(done.reshape(b, k, 1), finished, logp)
    cand = score.reshape(b, k, 1) + logp
    top, idx = jax.lax.top_k(cand.reshape(b, k * v), k)
    src = (idx // v + jnp.arange(b)[:, None] * k).reshape(n)
    tok = (idx % v).reshape(n).astype(jnp.int32)
    state = _reorder(state, src, n)
    was_done = done[src]
    tokens = tokens[src].at[:, t].set(tok)
    length = length[src] + (~was_done).astype(jnp.int32)
    return state, tok, was_done | (tok == eos_id), tokens, top.reshape(n), length

  # Only the first copy of each example starts alive: the others would repeat its candidates.
  score0 = jnp.tile(jnp.concatenate([jnp.zeros((1,)), jnp.full((k - 1,), _NEG)]), b)
  init = (state, repeat_rows(first.astype(jnp.int32), k), jnp.zeros((n,), bool),
          jnp.full((n, steps), pad_id, jnp.int32), score0.astype(jnp.float32),
          jnp.zeros((n,), jnp.int32))
  _, _, _, tokens, score, length = jax.lax.fori_loop(0, steps, body, init)
  rank = score
  if length_penalty:
    rank = score / jnp.maximum(length, 1).astype(jnp.float32) ** length_penalty
  best = jnp.argmax(rank.reshape(b, k), axis=-1) + jnp.arange(b) * k
  return tokens[best], rank[best]
