"""DMAE + NegNCE + TPM-CL's pure functions (arXiv 2309.11082): NegNCE and InfoNCE on a similarity
matrix, margin ranking, the token-wise similarity with its visual and textual cues, TPM-CL's weight
predictor, selector and margin loss, and the keyword tagger behind the textual cue.

Expected numbers are worked by hand (in the comments) or come from plain Python loops written
independently of the vectorised code.
"""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bigvl.data import keywords
from bigvl.losses import infonce_symmetric, margin_ranking, negnce_symmetric
from bigvl.losses import negnce as negnce_lib
from bigvl.systems.dmae import similarity, tpm

GLM_MODEL = Path(__file__).parents[2] / "shared/tokenizers/glm_chinese_sp.model"


# --------------------------------------------------------------------------- NegNCE


def test_negnce_one_hard_negative():
  # S01 = .6 beats its row's positive S00 = .5: H = {(0, 1)}; S10 = .1 beats neither .4 nor .5.
  # scale 10: row 0 softmax of (5, 6): p00 = 1/(1+e), p01 = e/(1+e); row 1 of (1, 4): p11 =
  # 1/(1+e^-3). −log p00 = log(1+e) = 1.3132617, −log p11 = log(1+e^-3) = 0.0485874;
  # −log(1 − p01) = −log p00. L = (1.3132617 + 0.0485874)/2 + 0.5·1.3132617 = 1.3375554.
  s = jnp.array([[0.5, 0.6], [0.1, 0.4]])
  loss, aux = negnce_lib.negnce(s, scale=10.0)
  assert float(loss) == pytest.approx(1.3375554, abs=1e-5)
  assert float(aux["loss_neg"]) == pytest.approx(1.3132617, abs=1e-5)
  assert float(aux["hard_fraction"]) == pytest.approx(0.5)
  # Sᵀ = [[.5, .1], [.6, .4]]: H = {(1, 0)}; −log p00 = log(1+e^-4) = 0.0181499, −log p11 =
  # log(1+e^2) = 2.1269280 = −log(1 − p10). L(Sᵀ) = (0.0181499 + 2.1269280)/2 + 0.5·2.1269280
  # = 2.1360030; symmetric (1.3375554 + 2.1360030)/2 = 1.7367792.
  sym, sym_aux = negnce_symmetric(s, scale=10.0)
  assert float(sym_aux["loss_v2t"]) == pytest.approx(2.1360030, abs=1e-5)
  assert float(sym) == pytest.approx(1.7367792, abs=1e-5)


def test_negnce_no_hard_negative_is_the_positive_term_alone():
  # Every negative is below both positives: H empty, L = mean(log(1+e^-7), log(1+e^-5))
  # = (0.00091147 + 0.00671535)/2 = 0.00381341.
  s = jnp.array([[0.9, 0.2], [0.3, 0.8]])
  loss, aux = negnce_lib.negnce(s, scale=10.0)
  assert float(loss) == pytest.approx(0.00381341, abs=1e-6)
  assert float(aux["loss_neg"]) == 0.0 and float(aux["hard_fraction"]) == 0.0
  # The margin widens H: with margin .6, S10 = .3 > .8 − .6 makes (1, 0) hard.
  assert np.array_equal(negnce_lib.hard_negatives(s, 0.6), [[False, False], [True, False]])


def test_negnce_clamp_and_gradients_finite():
  # A saturated row (p = 1 − 1e-6 after the clamp) must not give inf or NaN.
  s = jnp.array([[1.0, -1.0, 0.99], [0.0, 1.0, -1.0], [1.0, 0.0, 0.5]])
  val, grad = jax.value_and_grad(lambda x: negnce_symmetric(x, scale=100.0)[0])(s)
  assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(grad)))


def test_infonce_symmetric_on_a_matrix():
  # 2×2, scale 1: rows (1, 0) and (0, 1) → each CE is log(1 + e^-1) = 0.3132617, columns too.
  loss, _ = infonce_symmetric(jnp.eye(2), scale=1.0)
  assert float(loss) == pytest.approx(0.3132617, abs=1e-6)


def test_negnce_on_a_column_sharded_matrix_under_jit():
  n = max(d for d in (1, 2, 4, 8) if d <= jax.device_count())
  mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
  s = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8, 8)), jnp.float32)
  want = negnce_symmetric(s)[0]
  sharded = jax.device_put(s, NamedSharding(mesh, P(None, "data")))
  got = jax.jit(lambda x: negnce_symmetric(x)[0])(sharded)
  assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_margin_ranking():
  # max(0, .6 − (.9 − .2)) = 0, max(0, .6 − (.5 − .4)) = .5 → mean .25.
  got = margin_ranking(jnp.array([0.9, 0.5]), jnp.array([0.2, 0.4]), margin=0.6)
  assert float(got) == pytest.approx(0.25)


# --------------------------------------------------------------------------- similarity


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _loop_similarity(t, tw, tm, v, vm, cue, cue_scale=0.5):
  """The token-wise similarity with plain loops, from its definition."""
  out = np.zeros((t.shape[0], v.shape[0]))
  for a in range(t.shape[0]):
    words = [w for w in range(t.shape[1]) if tm[a, w]]
    for b in range(v.shape[0]):
      frames = [k for k in range(v.shape[1]) if vm[b, k]]
      if not words or not frames:
        continue
      total = sum(tw[a, w] for w in words)
      t2v = 0.0
      for w in words:
        score = {k: float(t[a, w] @ v[b, k]) for k in frames}
        best = max(frames, key=lambda k: score[k])
        term = score[best]
        others = [k for k in frames if k != best]
        if cue and others:
          ff = {k: float(v[b, best] @ v[b, k]) for k in others}
          k2 = max(others, key=lambda k: ff[k])
          term += cue_scale * max(0.0, ff[k2]) * score[k2]
        t2v += tw[a, w] / total * term
      v2t = np.mean([max(float(t[a, w] @ v[b, k]) for w in words) for k in frames])
      out[a, b] = (t2v + v2t) / 2
  return out


def _random_batch(seed, bt=3, bv=4, nt=5, nv=4, d=6):
  r = np.random.default_rng(seed)
  t = _unit(r.normal(size=(bt, nt, d)))
  v = _unit(r.normal(size=(bv, nv, d)))
  tm = (r.random((bt, nt)) > 0.3).astype(np.int32)
  tm[:, 0] = 1
  tm[0] = [1, 1, 0, 0, 0]
  vm = (r.random((bv, nv)) > 0.3).astype(np.int32)
  vm[:, 0] = 1
  vm[1] = [1, 0, 0, 0]           # one valid frame: no cue
  tw = r.choice([1.0, 2.0], size=(bt, nt))
  return t, tw, tm, v, vm


@pytest.mark.parametrize("cue", [False, True])
def test_token_wise_similarity_against_loops(cue):
  for seed in range(3):
    t, tw, tm, v, vm = _random_batch(seed)
    got = similarity.token_wise_similarity(jnp.asarray(t, jnp.float32), jnp.asarray(tw),
                                           jnp.asarray(tm), jnp.asarray(v, jnp.float32),
                                           jnp.asarray(vm), visual_cue=cue)
    np.testing.assert_allclose(np.asarray(got), _loop_similarity(t, tw, tm, v, vm, cue),
                               atol=1e-5)
    pair = similarity.pair_similarity(jnp.asarray(t[:3], jnp.float32), jnp.asarray(tw[:3]),
                                      jnp.asarray(tm[:3]), jnp.asarray(v[:3], jnp.float32),
                                      jnp.asarray(vm[:3]), visual_cue=cue)
    np.testing.assert_allclose(np.asarray(pair), np.diagonal(np.asarray(got)[:, :3]), atol=1e-6)


def test_dmae_cues_by_hand():
  # Words t0 = (1, 0), t1 = (0, 1); frames v0 = (1, 0), v1 = (.6, .8), v2 = (0, 1).
  # S = [[1, .6, 0], [0, .8, 1]]; v2t = mean(1, .8, 1) = .9333333.
  # Visual cue: t0's best frame v0, its most similar other frame v1 (cos .6): + .5·.6·.6 = .18;
  # t1's best v2, most similar other v1 (cos .8): + .5·.8·.8 = .32.
  t = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
  v = jnp.array([[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]])
  ones = jnp.ones((1, 2))

  def sim(weight, vm, cue):
    return float(similarity.token_wise_similarity(t, weight, ones, v, jnp.array([vm]),
                                                  visual_cue=cue)[0, 0])
  assert sim(None, [1, 1, 1], False) == pytest.approx((1.0 + 0.9333333) / 2, abs=1e-6)
  assert sim(None, [1, 1, 1], True) == pytest.approx((1.25 + 0.9333333) / 2, abs=1e-6)
  # Textual cue: t0 a keyword (2), t1 not (1): t2v = (2·1.18 + 1.32)/3 = 1.2266667.
  assert sim(jnp.array([[2.0, 1.0]]), [1, 1, 1], True) == pytest.approx(1.08, abs=1e-6)
  # v2 padded: t1's best is v1 (.8), whose other frame v0 scores 0 for t1: no cue for t1;
  # t2v = (1.18 + .8)/2 = .99, v2t = (1 + .8)/2 = .9.
  assert sim(None, [1, 1, 0], True) == pytest.approx(0.945, abs=1e-6)


def test_padding_never_wins_a_maximum():
  # All valid similarities are negative: a padding frame (or word) that competed with 0 would win.
  t = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
  v = jnp.array([[[-1.0, 0.0], [0.0, -1.0], [1.0, 0.0]]])
  got = similarity.token_wise_similarity(t, None, jnp.array([[1, 0]]), v, jnp.array([[1, 1, 0]]))
  # Word 0 only, frames 0 and 1: S = [-1, 0] → t2v = 0, v2t = mean(-1, 0) = -.5.
  assert float(got[0, 0]) == pytest.approx(-0.25, abs=1e-6)


def test_similarity_gradients_finite_with_empty_rows():
  t, tw, tm, v, vm = _random_batch(0)
  tm[2] = 0                       # a text without valid words scores 0
  vm[3] = 0

  def f(t, v):
    return jnp.sum(similarity.token_wise_similarity(t, jnp.asarray(tw), jnp.asarray(tm), v,
                                                    jnp.asarray(vm), visual_cue=True))
  s = similarity.token_wise_similarity(jnp.asarray(t), None, jnp.asarray(tm), jnp.asarray(v),
                                       jnp.asarray(vm), visual_cue=True)
  assert np.all(np.asarray(s)[2] == 0) and np.all(np.asarray(s)[:, 3] == 0)
  gt, gv = jax.grad(f, argnums=(0, 1))(jnp.asarray(t, jnp.float32), jnp.asarray(v, jnp.float32))
  assert np.all(np.isfinite(np.asarray(gt))) and np.all(np.isfinite(np.asarray(gv)))


# --------------------------------------------------------------------------- TPM-CL


def test_selector_drops_the_top_tokens_below_the_threshold():
  # Sorted .5, .3, .1, .1: cumulative .5 < .6 (dropped), .8, .9, 1 (kept).
  keep = tpm.select_partial(jnp.array([0.5, 0.3, 0.1, 0.1]), jnp.ones(4), 0.6)
  assert np.array_equal(keep, [False, True, True, True])
  # Order does not matter, padding is never kept: .5 and .3 → cumulative .5, .8 over (.1, .5, .3,
  # .1) with a padded slot.
  keep = tpm.select_partial(jnp.array([[0.1, 0.5, 0.7, 0.3, 0.1]]), jnp.array([[1, 1, 0, 1, 1]]))
  assert np.array_equal(keep, [[True, False, False, True, True]])
  # One dominant token (≥ threshold on its own) drops nothing.
  assert np.all(tpm.select_partial(jnp.array([0.7, 0.2, 0.1]), jnp.ones(3)))


def test_weight_predictor_sums_to_one_and_ignores_padding():
  d = 8
  pred = tpm.WeightPredictor(d, rngs=nnx.Rngs(0))
  r = np.random.default_rng(0)
  q = jnp.asarray(r.normal(size=(2, d)), jnp.float32)
  k = r.normal(size=(2, 5, d))
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  w = np.asarray(pred(q, jnp.asarray(k, jnp.float32), mask))
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
  assert np.all(w[0, 3:] == 0) and np.all(w > -1e-9)
  k2 = k.copy()
  k2[0, 3:] = 100.0 * r.normal(size=(2, d))
  w2 = np.asarray(pred(q, jnp.asarray(k2, jnp.float32), mask))
  np.testing.assert_allclose(w2, w, atol=1e-6)


def _tpm_inputs(seed=0, b=4, nt=6, nv=5, d=8):
  r = np.random.default_rng(seed)
  t = jnp.asarray(_unit(r.normal(size=(b, nt, d))), jnp.float32)
  words = np.zeros((b, nt), np.float32)
  lengths = r.integers(3, nt, b)
  for i, n in enumerate(lengths):
    words[i, 1:n] = 1.0 / (n - 1)            # [CLS] at 0 and padding weigh 0
  v = jnp.asarray(_unit(r.normal(size=(b, nv, d))), jnp.float32)
  vm = np.ones((b, nv), np.int32)
  vm[0, 3:] = 0
  return t, jnp.asarray(words), v, jnp.asarray(vm)


def test_tpm_margin_loss_types_and_gradients():
  t, tw, v, vm = _tpm_inputs()
  text_w, frame_w = tpm.WeightPredictor(8, rngs=nnx.Rngs(1)), tpm.WeightPredictor(8,
                                                                                  rngs=nnx.Rngs(2))
  gt, st = nnx.split(text_w)
  gf, sf = nnx.split(frame_w)

  @functools.partial(jax.jit, static_argnums=4)
  def f(st, sf, t, v, partial_type):
    loss, aux = tpm.tpm_margin_loss(t, tw, v, vm, text_weigher=nnx.merge(gt, st),
                                    frame_weigher=nnx.merge(gf, sf), partial_type=partial_type,
                                    margin=3.0, visual_cue=True)
    return loss, aux

  l2, a2 = f(st, sf, t, v, 2)
  l3, a3 = f(st, sf, t, v, 3)
  l4, a4 = f(st, sf, t, v, 4)
  assert set(a2) >= {"t_v", "tg_v"} and "tg_tgp" not in a2 and set(a3) >= {"tg_tgp"}
  assert float(l4) == pytest.approx(float(l2) + float(l3), rel=1e-6)
  assert 0 < float(a4["kept_words"]) < 1 and 0 < float(a4["kept_frames"]) <= 1
  grads = jax.jit(jax.grad(lambda *a: f(*a, 4)[0], argnums=(0, 1, 2, 3)))(st, sf, t, v)
  leaves = [np.asarray(x) for x in jax.tree.leaves(grads)]
  assert all(np.all(np.isfinite(x)) for x in leaves)
  text_norm = sum(float(np.abs(x).sum()) for x in jax.tree.leaves(grads[0]))
  frame_norm = sum(float(np.abs(x).sum()) for x in jax.tree.leaves(grads[1]))
  assert text_norm > 0            # through t_g and t_g'
  assert frame_norm == 0          # frame weights only select (as the authors')
  with pytest.raises(ValueError, match="partial_type"):
    f(st, sf, t, v, 1)


# --------------------------------------------------------------------------- keywords


def test_keyword_weights_english_and_chinese():
  tagger = keywords.default_tagger()
  # a: stop word (1); red, circle, moves, left: keywords (2). Total 9.
  got = keywords.word_weights("a red circle moves left", tagger)
  assert [w for w, _ in got] == ["a", "red", "circle", "moves", "left"]
  np.testing.assert_allclose([x for _, x in got], [1 / 9, 2 / 9, 2 / 9, 2 / 9, 2 / 9])
  # jieba: 红色/n 圆形/n 向/p 左 (lexicon; jieba says m) 移动/vn. Total 9.
  got = keywords.word_weights("红色圆形向左移动", tagger)
  assert [w for w, _ in got] == ["红色", "圆形", "向", "左", "移动"]
  np.testing.assert_allclose([x for _, x in got], [2 / 9, 2 / 9, 1 / 9, 2 / 9, 2 / 9])


def test_english_tagger_rules():
  tag = dict(keywords.EnglishTagger().tag("Then it shows up, 3 zebras!"))
  assert tag == {"Then": False, "it": False, "shows": True, "up": True, ",": False, "3": False,
                 "zebras": True, "!": False}      # unknown words with letters are keywords


def test_world_vocabulary_is_keywords():
  from data_pipelines import synthetic_world as sw
  from data_pipelines import video_world as vw
  words = ([c["en"] for c in sw.COLOURS] + [s["en"] for s in sw.SHAPES]
           + [s["en_plural"] for s in sw.SHAPES] + list(vw.DIRECTIONS)
           + ["moves", "appears", "disappears", "changes", "becomes", "become", "turns"])
  tagger = keywords.EnglishTagger()
  assert [w for w in words if not tagger.is_keyword(w)] == []
  zh = [c["zh"] for c in sw.COLOURS] + [s["zh"] for s in sw.SHAPES]
  assert [w for w in zh if w not in keywords.ZH_LEXICON] == []


@pytest.fixture(scope="module")
def glm_tokenizer():
  if not GLM_MODEL.exists():
    pytest.skip(f"{GLM_MODEL} not present")
  from bigvl.tokenizers import glm
  return glm.GLMTokenizer(str(GLM_MODEL), max_len=16)


def test_token_weights_on_glm_pieces(glm_tokenizer):
  tok, tagger = glm_tokenizer, keywords.default_tagger()
  ids, mask, w = keywords.token_weights(tok, "A red circle moves left", tagger)
  want_ids, want_mask = tok.encode("A red circle moves left")
  assert np.array_equal(ids, want_ids) and np.array_equal(mask, want_mask)
  # [CLS] ▁a ▁red ▁circle ▁moves ▁left EOS: 0, 1, 2, 2, 2, 2, 0 over 9.
  np.testing.assert_allclose(w[:7], np.array([0, 1, 2, 2, 2, 2, 0]) / 9, atol=1e-7)
  assert np.all(w[7:] == 0)
  # 红色 圆形 向左 移动: the piece 向左 covers 向 (1) and 左 (2) and takes 2; all four weigh 1/4.
  ids, mask, w = keywords.token_weights(tok, "红色圆形向左移动", tagger)
  assert np.array_equal(ids, tok.encode("红色圆形向左移动")[0])
  n = int(mask.sum())
  assert w[0] == 0 and w[n - 1] == 0
  np.testing.assert_allclose(w[1:n - 1], np.full(n - 2, 1 / (n - 2)), atol=1e-7)
  # Left truncation as tokenizer.encode; blanks weigh 0.
  long = "first  a red circle appears, then it moves left, and then it turns blue"
  ids, mask, w = keywords.token_weights(tok, long, tagger)
  assert np.array_equal(ids, tok.encode(long)[0]) and mask.sum() == 16
  assert w.sum() == pytest.approx(1.0) and w[0] == 0 and w[15] == 0


def test_token_weights_drop_augmentation(glm_tokenizer):
  tok, tagger = glm_tokenizer, keywords.default_tagger()
  text = "a red circle moves left, then it disappears."
  words = [w for w, _ in tagger.tag(text)]
  rng = np.random.default_rng(0)
  seen = set()
  for _ in range(40):
    ids, mask, w = keywords.token_weights(tok, text, tagger, drop=5, rng=rng)
    left = tok.decode(ids)
    assert np.array_equal(ids, tok.encode(left)[0])
    kept = [x for x, _ in tagger.tag(left)]
    dropped = len(words) - len(kept)
    assert 0 <= dropped <= 5 and len(kept) >= len(words) / 2
    assert {"red", "circle", "moves", "left", "disappears"} <= set(kept)   # keywords stay
    assert w.sum() == pytest.approx(1.0)
    seen.add(dropped)
  assert len(seen) > 2             # the rng draws how many
  ids, _, _ = keywords.token_weights(tok, text, tagger, drop=0, rng=rng)
  assert np.array_equal(ids, tok.encode(text)[0])


def test_jieba_is_imported_only_for_chinese():
  import subprocess
  import sys
  code = ("import sys; from bigvl.data import keywords as k; t = k.default_tagger(); "
          "t.tag('a red circle'); assert 'jieba' not in sys.modules; t.tag('红色圆形'); "
          "assert 'jieba' in sys.modules")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=str(Path(__file__).parents[1]))
  assert out.returncode == 0, out.stderr
  assert out.stderr == ""          # jieba's loading messages are silenced
