"""Decoding: the text decoder's KV cache, greedy and beam search (bigvl.models.layers.generate)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigvl.models.layers import generate
from bigvl.models.layers.decoder import TextDecoder

VOCAB, STEPS, EOS = 6, 4, 0


def _decoder(seed=0, vocab=VOCAB, max_len=8):
  return TextDecoder(vocab_size=vocab, width=16, depth=2, heads=2, mlp_dim=32, max_len=max_len,
                     context_width=12, rngs=nnx.Rngs(seed), init_std=0.5)


def _context(b=3, seed=1):
  rng = np.random.default_rng(seed)
  ctx = jnp.asarray(rng.standard_normal((b, 5, 12)), jnp.float32)
  mask = jnp.asarray(rng.random((b, 5)) < 0.8).at[:, 0].set(True)
  return ctx, mask


def _run(decoder, ctx, mask, *, beam=1, cache=True, steps=STEPS, banned=(), length_penalty=0.0):
  first = jnp.arange(ctx.shape[0], dtype=jnp.int32) % (VOCAB - 1) + 1
  if beam > 1:
    ctx, mask = generate.repeat_rows(ctx, beam), generate.repeat_rows(mask, beam)
  n = ctx.shape[0]
  if cache:
    decoder.init_cache(n, steps)
    graphdef, state, rest = nnx.split(decoder, nnx.Cache, ...)
    step = generate.cached_step(graphdef, rest, context=ctx, context_mask=mask)
  else:
    step, state = (generate.uncached_step(decoder, context=ctx, context_mask=mask),
                   jnp.full((n, steps), EOS, jnp.int32))
  kw = dict(eos_id=EOS, pad_id=EOS, banned=banned)
  if beam == 1:
    return generate.greedy(step, state, first, steps, **kw)
  return generate.beam_search(step, state, first, steps, beam=beam,
                              length_penalty=length_penalty, **kw)


def test_cached_decoding_equals_rerunning_the_whole_prefix():
  ctx, mask = _context()
  cached = _run(_decoder(), ctx, mask, cache=True)
  plain = _run(_decoder(), ctx, mask, cache=False)
  np.testing.assert_array_equal(cached[0], plain[0])
  np.testing.assert_allclose(cached[1], plain[1], atol=1e-5)
  # And the cached logits of a teacher-forced sequence equal the causal forward pass's.
  dec = _decoder()
  ids = jnp.asarray(np.random.default_rng(2).integers(0, VOCAB, (3, STEPS)), jnp.int32)
  full = dec(ids, context=ctx, context_mask=mask)
  dec.init_cache(3, STEPS)
  steps = [dec(ids[:, t:t + 1], context=ctx, context_mask=mask)[:, 0] for t in range(STEPS)]
  np.testing.assert_allclose(jnp.stack(steps, 1), full, atol=1e-5)


def test_beam_one_is_greedy():
  ctx, mask = _context()
  greedy = _run(_decoder(), ctx, mask, beam=1)
  beam = jax.jit(lambda c, m: _run(_decoder(), c, m, beam=1))(ctx, mask)
  np.testing.assert_array_equal(greedy[0], beam[0])
  # beam_search with beam=1 is greedy too (the function, not only the dispatch above).
  first = jnp.arange(3, dtype=jnp.int32) % (VOCAB - 1) + 1
  dec = _decoder()
  dec.init_cache(3, STEPS)
  graphdef, state, rest = nnx.split(dec, nnx.Cache, ...)
  step = generate.cached_step(graphdef, rest, context=ctx, context_mask=mask)
  toks, score = generate.beam_search(step, state, first, STEPS, beam=1, eos_id=EOS, pad_id=EOS)
  np.testing.assert_array_equal(toks, greedy[0])
  np.testing.assert_allclose(score, greedy[1], atol=1e-5)


def _exhaustive(decoder, ctx, mask, first, banned, steps):
  """The highest summed log-probability over every sequence of `steps` tokens (after EOS only
  padding, which costs nothing), each scored by the causal forward pass."""
  seqs = [s for s in itertools.product(range(VOCAB), repeat=steps)
          if not any(t in banned for t in s)
          and all(t == EOS for t in s[(s.index(EOS) if EOS in s else steps):])]
  best = []
  for b in range(ctx.shape[0]):
    ids = jnp.asarray([[int(first[b]), *s[:-1]] for s in seqs], jnp.int32)
    n = len(seqs)
    logp = jax.nn.log_softmax(decoder(ids, context=jnp.repeat(ctx[b:b + 1], n, 0),
                                      context_mask=jnp.repeat(mask[b:b + 1], n, 0)))
    scores = []
    for i, s in enumerate(seqs):
      ended = s.index(EOS) if EOS in s else steps
      scores.append(sum(float(logp[i, t, s[t]]) for t in range(min(ended + 1, steps))))
    k = int(np.argmax(scores))
    best.append((scores[k], seqs[k]))
  return best


def test_a_wide_beam_finds_the_best_sequence():
  ctx, mask = _context(b=2)
  banned, steps = (VOCAB - 1,), 3
  # Beam = every prefix of steps - 1 tokens: nothing is pruned, the search is exact.
  toks, score = _run(_decoder(), ctx, mask, beam=(VOCAB - 1) ** (steps - 1), banned=banned,
                     steps=steps)
  first = jnp.arange(2, dtype=jnp.int32) % (VOCAB - 1) + 1
  for b, (top, seq) in enumerate(_exhaustive(_decoder(), ctx, mask, first, banned, steps)):
    assert tuple(int(t) for t in toks[b]) == seq
    assert float(score[b]) == pytest.approx(top, abs=1e-4)
  # A narrow beam never beats the exact optimum, and banned tokens never appear.
  narrow, narrow_score = _run(_decoder(), ctx, mask, beam=2, banned=banned, steps=steps)
  assert not np.isin(np.asarray(narrow), banned).any()
  assert (np.asarray(narrow_score) <= np.asarray(score) + 1e-5).all()


def test_a_cache_longer_than_the_positions_is_refused():
  with pytest.raises(ValueError, match="positions"):
    _decoder(max_len=4).init_cache(2, 5)
