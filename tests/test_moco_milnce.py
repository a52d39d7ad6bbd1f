"""SNP-S3's shared loss pieces (arXiv 2401.17773): MIL-NCE, Local Vision-Word Matching, the choice of
significant words, and the functional MoCo queue and momentum encoder.

Expected values come from explicit Python/numpy loops written independently of the vectorised code,
or are worked by hand in the comments.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bigvl.losses import milnce as milnce_lib
from bigvl.losses import moco


def _lse(values):
  m = max(values)
  return m + math.log(sum(math.exp(v - m) for v in values))


def _unit(rng, *shape):
  x = rng.normal(size=shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --------------------------------------------------------------------------- MIL-NCE


def test_milnce_by_hand():
  # Row 0: positives {0, 1} of scores (1, 0, −1), τ = 1: −log((e + 1)/(e + 1 + e⁻¹))
  # = log(1 + e⁻¹/(e + 1)) = 0.0943446. Row 1: one positive (col 2) of (0, 0, 2): log(1 + 2e⁻²)
  # = 0.2395447. Mean 0.1669446.
  s = jnp.array([[1.0, 0.0, -1.0], [0.0, 0.0, 2.0]])
  pos = jnp.array([[True, True, False], [False, False, True]])
  loss, aux = milnce_lib.milnce(s, pos, 1.0)
  assert float(loss) == pytest.approx(0.1669446, abs=1e-6)
  assert int(aux["empty_rows"]) == 0 and float(aux["acc"]) == 1.0


def test_milnce_matches_a_loop_with_masks_and_an_empty_row():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(4, 6)).astype(np.float32)
  pos = rng.random((4, 6)) < 0.4
  valid = rng.random((4, 6)) < 0.8
  pos[0] = False                       # row 0: no positive at all
  pos[1, 2], valid[1, 2] = True, True  # row 1: at least one valid positive
  tau = 0.3
  per_row = []
  for i in range(4):
    num = [s[i, n] / tau for n in range(6) if pos[i, n] and valid[i, n]]
    den = [s[i, n] / tau for n in range(6) if valid[i, n]]
    if num:
      per_row.append(_lse(den) - _lse(num))
  want = sum(per_row) / len(per_row)
  loss, aux = milnce_lib.milnce(jnp.asarray(s), jnp.asarray(pos), tau, jnp.asarray(valid))
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert int(aux["empty_rows"]) == 4 - len(per_row)
  grad = jax.grad(lambda x: milnce_lib.milnce(x, jnp.asarray(pos), tau, jnp.asarray(valid))[0])(
      jnp.asarray(s))
  assert np.all(np.isfinite(np.asarray(grad)))
  assert np.all(np.asarray(grad)[0] == 0.0)   # the empty row has no loss


def test_milnce_one_positive_is_infonce():
  s = jnp.asarray(np.random.default_rng(1).normal(size=(5, 5)), jnp.float32)
  loss, _ = milnce_lib.milnce(s, jnp.eye(5, dtype=bool), 0.5)
  logits = np.asarray(s) / 0.5
  want = np.mean([_lse(list(logits[i])) - logits[i, i] for i in range(5)])
  assert float(loss) == pytest.approx(want, rel=1e-5)


def test_milnce_symmetric_and_union_match_loops():
  rng = np.random.default_rng(2)
  b, k, tau = 3, 2, 0.7
  x = rng.normal(size=(b, b, k)).astype(np.float32)
  valid = np.ones((b, b, k), bool)
  valid[2, 0, 1] = valid[1, 1, 0] = False
  rows, cols, union = [], [], []
  for i in range(b):
    num = [x[i, i, c] / tau for c in range(k) if valid[i, i, c]]
    row = [x[i, j, c] / tau for j in range(b) for c in range(k) if valid[i, j, c]]
    col = [x[j, i, c] / tau for j in range(b) for c in range(k) if valid[j, i, c]]
    rows.append(_lse(row) - _lse(num))
    cols.append(_lse(col) - _lse(num))
    union.append(_lse(row + col) - _lse(num))     # Miech's concatenation: positives twice
  loss, aux = milnce_lib.milnce_symmetric(jnp.asarray(x), tau, jnp.asarray(valid))
  assert float(aux["loss_row"]) == pytest.approx(np.mean(rows), rel=1e-5)
  assert float(aux["loss_col"]) == pytest.approx(np.mean(cols), rel=1e-5)
  assert float(loss) == pytest.approx(0.5 * (np.mean(rows) + np.mean(cols)), rel=1e-5)
  u, _ = milnce_lib.milnce_union(jnp.asarray(x), tau, jnp.asarray(valid))
  assert float(u) == pytest.approx(np.mean(union), rel=1e-5)


def test_milnce_errors_name_the_culprit():
  with pytest.raises(ValueError, match="temperature=0"):
    milnce_lib.milnce(jnp.zeros((2, 2)), jnp.eye(2, dtype=bool), 0.0)
  with pytest.raises(ValueError, match=r"\(B, B, K\)"):
    milnce_lib.milnce_symmetric(jnp.zeros((2, 3, 1)), 1.0)


# --------------------------------------------------------------------------- LVWM


def _lvwm_loop(words, wmask, clips, cmask, tau):
  """s_ij = τ·LSE over valid (word, clip) pairs; NaN where the pair has none."""
  b = words.shape[0]
  s = np.full((b, b), np.nan)
  for i in range(b):
    for j in range(b):
      vals = [float(words[i, w] @ clips[j, c]) / tau for w in range(words.shape[1]) if wmask[i, w]
              for c in range(clips.shape[1]) if cmask[j, c]]
      if vals:
        s[i, j] = tau * _lse(vals)
  return s


def test_lvwm_scores_by_hand():
  # One word (1, 0) against clips (1, 0) and (0, 1), τ = 0.5: 0.5·log(e² + e⁰) = 1.0634640.
  words = jnp.array([[[1.0, 0.0]]])
  clips = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
  s = milnce_lib.lvwm_scores(words, jnp.array([[True]]), clips, None, 0.5)
  assert float(s[0, 0]) == pytest.approx(0.5 * math.log(math.e ** 2 + 1), abs=1e-6)


def test_lvwm_scores_and_loss_match_loops():
  rng = np.random.default_rng(3)
  b, w, c, d, tau = 4, 3, 2, 5, 0.2
  words, clips = _unit(rng, b, w, d), _unit(rng, b, c, d)
  wmask = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]], bool)   # caption 3: no word
  cmask = np.array([[1, 1], [1, 0], [1, 1], [0, 1]], bool)
  want_s = _lvwm_loop(words, wmask, clips, cmask, tau)
  s = np.asarray(milnce_lib.lvwm_scores(*map(jnp.asarray, (words, wmask, clips, cmask)), tau))
  ok = ~np.isnan(want_s)
  np.testing.assert_allclose(s[ok], want_s[ok], rtol=1e-5)
  # The MIL-NCE by hand over (word, clip) instances: text i's bag against video j, both ways.
  t2v, v2t = [], []
  for i in range(b):
    if not wmask[i].any():
      continue
    inst = lambda ti, vj: [float(words[ti, a] @ clips[vj, e]) / tau for a in range(w)
                           if wmask[ti, a] for e in range(c) if cmask[vj, e]]
    num = inst(i, i)
    t2v.append(_lse(sum((inst(i, j) for j in range(b)), [])) - _lse(num))
    v2t.append(_lse(sum((inst(j, i) for j in range(b)), [])) - _lse(num))
  loss, aux = milnce_lib.lvwm_loss(*map(jnp.asarray, (words, wmask, clips, cmask)), tau)
  assert float(aux["loss_t2v"]) == pytest.approx(np.mean(t2v), rel=1e-5)
  assert float(aux["loss_v2t"]) == pytest.approx(np.mean(v2t), rel=1e-5)
  assert float(loss) == pytest.approx(0.5 * (np.mean(t2v) + np.mean(v2t)), rel=1e-5)
  assert int(aux["empty_rows"]) == 1
  grads = jax.grad(lambda x: milnce_lib.lvwm_loss(x, jnp.asarray(wmask), jnp.asarray(clips),
                                                  jnp.asarray(cmask), tau)[0])(jnp.asarray(words))
  assert np.all(np.isfinite(np.asarray(grads)))
  assert np.all(np.asarray(grads)[~wmask] == 0.0)     # masked words get no gradient


def test_gather_words_first_k_fewer_and_fallback():
  feats = jnp.arange(3 * 6 * 2, dtype=jnp.float32).reshape(3, 6, 2)
  sig = jnp.array([[0, 1, 1, 0, 1, 1],      # four significant: the first three, 1 2 4
                   [0, 0, 0, 1, 0, 0],      # one: the other two slots masked out
                   [0, 0, 0, 0, 0, 0]], bool)  # none: fall back to the valid tokens
  valid = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0]], bool)
  out, mask, pos = milnce_lib.gather_words(feats, sig, 3, valid=valid)
  mask, pos = np.asarray(mask), np.asarray(pos)
  assert list(pos[0]) == [1, 2, 4] and mask[0].all()
  assert pos[1, 0] == 3 and list(mask[1]) == [True, False, False]
  # The short caption (valid tokens 1 and 2 only) picks exactly those, and masks the third slot.
  assert list(pos[2, :2]) == [1, 2] and list(mask[2]) == [True, True, False]
  valid_np = np.asarray(valid)
  assert all(valid_np[i, pos[i, j]] for i in range(3) for j in range(3) if mask[i, j])
  np.testing.assert_array_equal(np.asarray(out)[mask], np.asarray(feats)[
      np.nonzero(mask)[0], pos[mask]])
  assert np.all(np.asarray(out)[~mask] == 0.0)
  # Without `valid` there is no fallback: the caption with no significant word is all masked.
  _, mask_nf, _ = milnce_lib.gather_words(feats, sig, 3)
  assert not np.asarray(mask_nf)[2].any()


def test_gather_words_random_picks_valid_significant_positions():
  rng = np.random.default_rng(4)
  b, length = 16, 12
  sig = rng.random((b, length)) < 0.35
  valid = np.ones((b, length), bool)
  valid[:, 9:] = False                       # padding: the fallback must never land there
  sig[:3] = False                            # three captions with no significant word
  feats = jnp.asarray(rng.normal(size=(b, length, 4)), jnp.float32)
  seen = set()
  for seed in range(5):
    _, mask, pos = milnce_lib.gather_words(feats, jnp.asarray(sig), 3, jax.random.key(seed),
                                           jnp.asarray(valid))
    mask, pos = np.asarray(mask), np.asarray(pos)
    for i in range(b):
      cand = sig[i] & valid[i] if (sig[i] & valid[i]).any() else valid[i]
      picked = pos[i][mask[i]]
      assert mask[i].sum() == min(3, cand.sum())
      assert len(set(picked)) == len(picked) and all(cand[p] for p in picked)
    seen.add(tuple(pos[0]))
  assert len(seen) > 1                       # the rng changes the choice


def test_gather_words_errors():
  with pytest.raises(ValueError, match="k=4"):
    milnce_lib.gather_words(jnp.zeros((1, 3, 2)), jnp.ones((1, 3), bool), 4)


# --------------------------------------------------------------------------- MoCo


def test_enqueue_matches_a_ring_buffer_loop_with_wrap_around():
  size, dim, b, steps = 7, 3, 3, 6                # 3 ∤ 7: writes straddle the end
  rng = np.random.default_rng(5)
  state = moco.init_queue(size, dim)
  want = np.zeros((size, dim), np.float32)
  ptr = count = 0
  step = jax.jit(moco.enqueue)
  for n in range(steps):
    keys = rng.normal(size=(b, dim)).astype(np.float32)
    for r in range(b):
      want[ptr] = keys[r]
      ptr = (ptr + 1) % size
    count = min(count + b, size)
    state = step(state, jnp.asarray(keys))
    np.testing.assert_array_equal(np.asarray(state["queue"]), want)
    assert int(state["ptr"]) == ptr and int(state["count"]) == count
    assert list(np.asarray(moco.valid_rows(state))) == [r < count for r in range(size)]
  assert state["ptr"].dtype == jnp.int32 and state["count"].dtype == jnp.int32


def test_enqueue_errors_name_the_culprit():
  state = moco.init_queue(4, 2)
  with pytest.raises(ValueError, match="B=5 exceeds the queue size 4"):
    moco.enqueue(state, jnp.zeros((5, 2)))
  with pytest.raises(ValueError, match=r"keys \(2, 3\)"):
    moco.enqueue(state, jnp.zeros((2, 3)))


def test_queue_contrastive_excludes_unwritten_rows():
  rng = np.random.default_rng(6)
  b, dim, size, tau = 4, 8, 10, 0.05
  q, k = _unit(rng, b, dim), _unit(rng, b, dim)
  state = moco.enqueue(moco.init_queue(size, dim), jnp.asarray(_unit(rng, 6, dim)))  # 6 of 10
  queue, valid = np.asarray(state["queue"]), np.asarray(moco.valid_rows(state))
  want = np.mean([_lse([float(q[i] @ k[i]) / tau] + [float(q[i] @ queue[r]) / tau
                                                     for r in range(size) if valid[r]])
                  - float(q[i] @ k[i]) / tau for i in range(b)])
  loss, aux = moco.queue_contrastive(jnp.asarray(q), jnp.asarray(k), state["queue"],
                                     moco.valid_rows(state), tau)
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert int(aux["negatives"]) == 6
  # The zero rows, were they counted, would add 4 terms exp(0) per row: a different loss.
  unmasked, _ = moco.queue_contrastive(jnp.asarray(q), jnp.asarray(k), state["queue"], None, tau)
  assert abs(float(unmasked) - want) > 1e-4
  # An empty queue leaves only the positive: loss 0.
  empty = moco.init_queue(size, dim)
  zero, _ = moco.queue_contrastive(jnp.asarray(q), jnp.asarray(k), empty["queue"],
                                   moco.valid_rows(empty), tau)
  assert float(zero) == pytest.approx(0.0, abs=1e-6)
  # No gradient reaches the keys or the queue.
  gk, gq = jax.grad(lambda kk, qq: moco.queue_contrastive(jnp.asarray(q), kk, qq, None, tau)[0],
                    argnums=(0, 1))(jnp.asarray(k), state["queue"])
  assert not np.any(np.asarray(gk)) and not np.any(np.asarray(gq))


def test_momentum_update_closed_form_and_loop():
  rng = np.random.default_rng(7)
  params = {"a": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": {"c": jnp.ones(4)}}
  ema = jax.tree.map(jnp.zeros_like, params)
  m, n = 0.9, 20
  upd = jax.jit(moco.momentum_update)
  for _ in range(n):
    ema = upd(ema, params, m)
  # Fixed params from a zero start: ema_N = (1 − mᴺ)·params.
  for got, p in zip(jax.tree.leaves(ema), jax.tree.leaves(params)):
    np.testing.assert_allclose(np.asarray(got), (1 - m ** n) * np.asarray(p), rtol=1e-5)
  # Changing params: the step equals the loop's float32 arithmetic exactly.
  e0, p1 = np.float32(0.25), np.float32(-1.5)
  one = moco.momentum_update({"x": jnp.float32(e0)}, {"x": jnp.float32(p1)}, 0.9999)
  assert float(one["x"]) == float(np.float32(0.9999) * e0 + np.float32(1 - 0.9999) * p1)
  bf = moco.momentum_update({"x": jnp.ones(2, jnp.bfloat16)}, {"x": jnp.zeros(2)}, 0.5)
  assert bf["x"].dtype == jnp.bfloat16 and float(bf["x"][0]) == 0.5


# --------------------------------------------------------------------------- sharded == 1 device


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_sharded_jit_equals_one_device():
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  batch = NamedSharding(mesh, P("data"))
  repl = NamedSharding(mesh, P())
  rng = np.random.default_rng(8)
  b, dim, size, tau = 16, 8, 40, 0.05
  q, k = _unit(rng, b, dim), _unit(rng, b, dim)
  words, clips = _unit(rng, b, 3, dim), _unit(rng, b, 2, dim)
  wmask = rng.random((b, 3)) < 0.7
  cmask = np.ones((b, 2), bool)
  tokens = rng.normal(size=(b, 6, dim)).astype(np.float32)
  sig = rng.random((b, 6)) < 0.4

  def step(state, q, k, words, wmask, clips, cmask, tokens, sig):
    lq, _ = moco.queue_contrastive(q, k, state["queue"], moco.valid_rows(state), tau)
    lw, _ = milnce_lib.lvwm_loss(words, wmask, clips, cmask, tau)
    picked, pmask, _ = milnce_lib.gather_words(tokens, sig, 3, jax.random.key(0))
    return lq, lw, picked, pmask, moco.enqueue(state, k)

  state = moco.init_queue(size, dim)
  for _ in range(2):   # fill part of the queue first, so the loss sees real negatives
    state = moco.enqueue(state, jnp.asarray(_unit(rng, b, dim)))
  args = (q, k, words, wmask, clips, cmask, tokens, sig)
  want = jax.jit(step)(state, *map(jnp.asarray, args))
  for queue_sharding in (repl, NamedSharding(mesh, P("data", None))):
    s_state = {"queue": jax.device_put(state["queue"], queue_sharding),
               "count": jax.device_put(state["count"], repl),
               "ptr": jax.device_put(state["ptr"], repl)}
    got = jax.jit(step)(s_state, *(jax.device_put(a, batch) for a in args))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
