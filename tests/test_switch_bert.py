"""Switch-BERT: the mode masks, the mixing weights, the joint baseline against plain attention,
padding, a learned input switch that finds the informative depth, and the referring-box helpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bigvl.models import switch_bert as sb

SMALL = dict(width=16, heads=2, mlp_dim=32, depth=3, text_in=12, image_in=8, text_depths=2,
             image_depths=3, num_answers=5)


def _model(seed: int = 0, **kw) -> sb.SwitchBert:
  return sb.SwitchBert(sb.SwitchConfig(**{**SMALL, **kw}), rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def model() -> sb.SwitchBert:
  """The SMALL learned model, shared: building and compiling dominate these tests' time."""
  return _model()


# Jitted once per model and input shape: running a 3-layer model op by op on a slow CPU costs
# seconds, its gradient tens of seconds.
_encode = nnx.jit(lambda mod, text, image, mask: mod.encode(text, image, mask))


@nnx.jit
def _vqa_grads(mod, text, image, mask):
  return nnx.grad(lambda m: jnp.sum(jnp.square(m.vqa_logits(*m.encode(text, image, mask)))))(mod)


def _inputs(b: int = 2, nt: int = 5, nv: int = 4, seed: int = 0, cfg: dict = SMALL):
  rng = np.random.default_rng(seed)
  text = rng.standard_normal((cfg["text_depths"], b, nt, cfg["text_in"])).astype(np.float32)
  image = rng.standard_normal((cfg["image_depths"], b, nv, cfg["image_in"])).astype(np.float32)
  mask = np.ones((b, nt), bool)
  mask[0, 3:] = False
  return jnp.asarray(text), jnp.asarray(image), jnp.asarray(mask)


def test_mode_masks_match_explicit_loops():
  nt, nv = 3, 2
  n = nt + nv
  expect = np.zeros((3, n, n), bool)
  for q in range(n):
    for k in range(n):
      same = (q < nt) == (k < nt)
      expect[0, q, k] = same
      expect[1, q, k] = not same
      expect[2, q, k] = True
  got = sb.mode_masks(nt, nv)
  assert got.shape == (3, n, n) and got.dtype == bool
  np.testing.assert_array_equal(got, expect)
  assert sb.mode_masks(nt, nv) is got                              # built once per shape


def test_mixing_weights_sum_to_one_and_are_learned(model):
  m = model
  cfg = m.cfg
  valid = sb.candidate_mask(cfg.text_depths, cfg.image_depths, cfg.depth)
  # Layer l offers D_other + l candidates (0-based l): text reads image (D_v=3), image reads text.
  np.testing.assert_array_equal(valid.sum(-1), [[3, 2], [4, 3], [5, 4]])
  gumbel = _model(selection="gumbel")
  weights = {
      "softmax": m.mixing_weights(),
      "softmax_tau": nnx.jit(lambda mod, t: mod.mixing_weights(tau=t))(m, jnp.float32(0.3)),
      "gumbel": gumbel.mixing_weights(jax.random.key(1), tau=0.5),
      "gumbel_hard": gumbel.mixing_weights(jax.random.key(2), hard=True),
  }
  for name, (alpha, beta) in weights.items():
    assert alpha.shape == (3, 2, 3) and beta.shape == (3, 2, cfg.num_candidates), name
    np.testing.assert_allclose(alpha.sum(-1), 1.0, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(beta.sum(-1), 1.0, atol=1e-6, err_msg=name)
    assert np.all(np.asarray(beta)[~valid] == 0.0), name
  np.testing.assert_allclose(weights["softmax"][0], 1 / 3, atol=1e-6)   # zero logits: uniform
  assert not np.allclose(weights["gumbel"][1], weights["softmax"][1])   # noise was drawn

  text, image, mask = _inputs()
  r = np.random.default_rng(3)
  rt = jnp.asarray(r.standard_normal((2, 5, 16)), jnp.float32)
  rv = jnp.asarray(r.standard_normal((2, 4, 16)), jnp.float32)

  def loss(mod):
    t, v = mod.encode(text, image, mask)
    return jnp.sum(t * rt) + jnp.sum(v * rv)

  grads = nnx.jit(nnx.grad(loss))(m)
  ga, gb = np.asarray(grads.encoder.alpha_logits[...]), np.asarray(grads.encoder.beta_logits[...])
  assert np.all(np.abs(ga).sum(-1) > 1e-6), ga                    # every (layer, modality)
  assert np.all(np.abs(np.where(valid, gb, 0)).sum(-1) > 1e-6), gb
  assert np.all(gb[~valid] == 0.0)


def _plain_joint(enc: sb.SwitchEncoder, text_bank, image_bank, mask):
  """Single-stream reference: plain full attention over [text; image] with the text padding mask,
  using the encoder's own weights."""
  t, v = enc.project(text_bank, image_bank)
  x = jnp.concatenate([t[-1], v[-1]], axis=1)
  key_mask = jnp.concatenate([mask, jnp.ones(v.shape[1:3], bool)], axis=1)
  for layer in enc.layers:
    x = x + layer.self_attn(layer.self_attn_layer_norm(x), key_mask=key_mask)
    x = x + layer.ffn(layer.final_layer_norm(x))
  x = enc.layer_norm(x)
  return x[:, :t.shape[2]], x[:, t.shape[2]:]


def test_joint_baseline_is_plain_full_attention(model):
  m = _model(modes="joint")
  assert m.encoder.alpha_logits is None and m.encoder.beta_logits is None
  names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}
  assert not any("logits" in n for n in names)
  alpha, beta = m.mixing_weights(jax.random.key(0))
  np.testing.assert_array_equal(alpha[..., 2], 1.0)
  valid = sb.candidate_mask(2, 3, 3)
  np.testing.assert_array_equal(np.argmax(beta, -1), valid.sum(-1) - 1)   # current partner state
  text, image, mask = _inputs()
  got_t, got_v = _encode(m, text, image, mask)
  ref_t, ref_v = nnx.jit(_plain_joint)(m.encoder, text, image, mask)
  np.testing.assert_allclose(got_t, ref_t, atol=1e-5)
  np.testing.assert_allclose(got_v, ref_v, atol=1e-5)
  # The learned model with the same weights but uniform α/β is a different function.
  learned = model
  lt, _ = _encode(learned, text, image, mask)
  ref_lt, _ = nnx.jit(_plain_joint)(learned.encoder, text, image, mask)
  assert float(jnp.abs(lt - ref_lt).max()) > 1e-3


def test_padding_is_ignored_and_never_nan(model):
  m = model
  text, image, mask = _inputs()
  t1, v1 = _encode(m, text, image, mask)
  noise = jax.random.normal(jax.random.key(5), text.shape) * 10
  text2 = jnp.where(mask[None, :, :, None], text, noise)
  t2, v2 = _encode(m, text2, image, mask)
  np.testing.assert_allclose(np.asarray(t1)[np.asarray(mask)], np.asarray(t2)[np.asarray(mask)],
                             atol=1e-5)
  np.testing.assert_allclose(v1, v2, atol=1e-5)
  np.testing.assert_allclose(m.vqa_logits(t1, v1, mask), m.vqa_logits(t2, v2, mask), atol=1e-5)

  for real in (1, 0):                        # only CLS is real; then no text at all
    few = jnp.zeros_like(mask).at[:, :real].set(True)
    t, v = _encode(m, text, image, few)
    assert np.all(np.isfinite(t)) and np.all(np.isfinite(v))
    grads = _vqa_grads(m, text, image, few)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(nnx.state(grads)))


def test_learned_switch_finds_the_informative_depth():
  """The label is added to one token of image depth 2 (of 4) only; the image state entering layer 1
  is depth 3 (noise), the image side never reads its bank again, and the text bank is a constant
  query. The answer can only reach text CLS through text→image attention over β's mix."""
  cfg = sb.SwitchConfig(width=16, heads=2, mlp_dim=32, depth=1, text_in=8, image_in=8,
                        text_depths=1, image_depths=4, num_answers=4)
  m = sb.SwitchBert(cfg, rngs=nnx.Rngs(0))
  b, nt, nv, informative = 64, 2, 4, 2
  classes = jax.random.normal(jax.random.key(100), (4, 8)) * 3.0
  query = jnp.broadcast_to(jax.random.normal(jax.random.key(101), (1, 1, nt, 8)), (1, b, nt, 8))
  mask = jnp.ones((b, nt), bool)

  def batch(key):
    k1, k2 = jax.random.split(key)
    labels = jax.random.randint(k1, (b,), 0, 4)
    image = jax.random.normal(k2, (4, b, nv, 8))
    return image.at[informative, :, 0].add(classes[labels]), labels

  def loss(mod, image, labels):
    logits = mod.vqa_logits(*mod.encode(query, image, mask))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  opt = nnx.Optimizer(m, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(mod, opt, key):
    image, labels = batch(key)
    grads = nnx.grad(loss)(mod, image, labels)
    opt.update(mod, grads)

  for key in jax.random.split(jax.random.key(7), 300):
    step(m, opt, key)
  _, beta = m.mixing_weights()
  text_beta = np.asarray(beta[0, sb.TEXT, :4])
  predict = nnx.jit(
      lambda mod, image: jnp.argmax(mod.vqa_logits(*mod.encode(query, image, mask)), -1))
  hits = [predict(m, image) == labels for image, labels in map(batch, jax.random.split(
      jax.random.key(999), 4))]
  acc = float(jnp.mean(jnp.stack(hits)))                          # 256 fresh examples
  print(f"text β at layer 1 over image depths: {np.round(text_beta, 3)}, accuracy {acc:.3f}")
  assert int(np.argmax(text_beta)) == informative and text_beta[informative] > 0.5, text_beta
  assert acc > 0.7, acc                                          # chance: 0.25


def test_box_patch_weights():
  boxes = jnp.asarray([[[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 1.0],
                        [0.2, 0.2, 0.2, 0.6]]])
  w = np.asarray(sb.box_patch_weights(boxes, 2))
  np.testing.assert_allclose(w[0, 0], [1, 0, 0, 0], atol=1e-6)      # exactly the top-left patch
  np.testing.assert_allclose(w[0, 1], [0.25] * 4, atol=1e-6)        # the whole image
  np.testing.assert_allclose(w[0, 2], [0.5, 0, 0.5, 0], atol=1e-6)  # left column (raster order)
  np.testing.assert_array_equal(w[0, 3], 0.0)                       # no area, no weight
  c = np.asarray(sb.box_patch_weights(boxes, 2, has_cls=True))
  assert c.shape == (1, 4, 5)
  np.testing.assert_array_equal(c[..., 0], 0.0)
  np.testing.assert_allclose(c[..., 1:], w, atol=1e-7)


def test_refer_scores_never_pick_invalid_boxes(model):
  m = model
  text, image, mask = _inputs(nv=5)
  t, v = _encode(m, text, image, mask)
  r = np.random.default_rng(0)
  xy = r.uniform(0, 1, (2, 6, 2, 2))
  boxes = jnp.asarray(np.concatenate([xy.min(2), xy.max(2)], -1), jnp.float32)
  weights = sb.box_patch_weights(boxes, 2, has_cls=True)
  for seed in range(3):
    valid = np.random.default_rng(seed).uniform(size=(2, 6)) < 0.4
    valid[:, seed] = True
    scores = np.asarray(m.refer_scores(t, v, weights, jnp.asarray(valid)))
    assert scores.shape == (2, 6)
    assert np.all(valid[np.arange(2), scores.argmax(-1)])
    assert np.all(scores[~valid] < scores[valid].min())
  assert m.itm_logit(t, v).shape == (2,) and m.vqa_logits(t, v, mask).shape == (2, 5)
