"""Tests of the M²-Encoder model: shapes, masking, tower separation, sharding names, sizes, remat,
and parity with an independent NumPy forward written from docs/m2_encoder.md."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from flax import nnx

from bigvl.models import m2_encoder

# Smaller than "tiny" so the whole file runs in seconds on 2 CPU cores.
SMALL = dict(vocab_size=64, image_size=16, patch_size=8, text_positions=16, width=32, heads=4,
             mlp_dim=64, out_dim=16, depth=2, vl_depth=1)
AXIS_NAMES = {"vocab", "embed", "heads", "mlp", "position", "proj", "norm", "patch", "channels",
              None}


def _cfg(**overrides) -> m2_encoder.M2Config:
  return m2_encoder.config_for("tiny", **{**SMALL, **overrides})


# The programs here are tiny; XLA's backend optimisations cost more compile time than they save.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _with_params(cfg: m2_encoder.M2Config, params) -> m2_encoder.M2Encoder:
  """A model of `cfg` holding `params` (a Param state, or a function of each shape); no compile."""
  model = nnx.eval_shape(lambda: m2_encoder.M2Encoder(cfg, rngs=nnx.Rngs(0)))
  if callable(params):
    params = jax.tree.map(params, nnx.state(model, nnx.Param))
  nnx.update(model, params)
  return model


def _make(cfg: m2_encoder.M2Config) -> m2_encoder.M2Encoder:
  """The model's own initialisation, jitted: one compilation instead of one per eager op."""
  init = jax.jit(lambda: nnx.state(m2_encoder.M2Encoder(cfg, rngs=nnx.Rngs(0))),
                 compiler_options=FAST_COMPILE)
  return _with_params(cfg, init())


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=FAST_COMPILE)
def _run(method: str, graphdef, state, *args):
  return getattr(nnx.merge(graphdef, state), method)(*args)


def _forward(model, *args):
  return _run("__call__", *nnx.split(model), *args)


def _image(model, images):
  return _run("encode_image", *nnx.split(model), images)


def _text(model, ids, mask):
  return _run("encode_text", *nnx.split(model), ids, mask)


@pytest.fixture(scope="module")
def model() -> m2_encoder.M2Encoder:
  return _make(_cfg())


def _inputs(cfg, batch=3, length=7, seed=1):
  k1, k2 = jax.random.split(jax.random.key(seed))
  images = jax.random.uniform(k1, (batch, cfg.image_size, cfg.image_size, 3), minval=-1, maxval=1)
  ids = jax.random.randint(k2, (batch, length), 1, cfg.vocab_size, dtype=jnp.int32)
  lengths = jnp.array([length, 3, 1][:batch])
  mask = (jnp.arange(length)[None] < lengths[:, None]).astype(jnp.int32)
  return images, ids, mask


# --- An independent NumPy forward, float64, from the doc's description. ---------------------------

def _np_ln(x, p, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_dense(x, p):
  return x @ p["kernel"] + p.get("bias", 0.0)


def _np_layer(x, pad, p, br, heads):
  """pre-LN + Sub-LN: x += out(inner_ln(attn(ln(x)))); x += fc2(ffn_ln(gelu(fc1(ln(x)))))."""
  a = p["self_attn"]
  b, l, d = x.shape
  hd = d // heads
  h = _np_ln(x, p["self_attn_layer_norm"][br])
  q = _np_dense(h, a["q_proj"][br]) * hd ** -0.5
  k = _np_dense(h, a["k_proj"][br])
  v = _np_dense(h, a["v_proj"][br])
  q, k, v = (t.reshape(b, l, heads, hd).transpose(0, 2, 1, 3) for t in (q, k, v))
  s = q @ k.transpose(0, 1, 3, 2)
  if pad is not None:
    s = np.where(pad[:, None, None, :], -np.inf, s)
  s = np.exp(s - s.max(-1, keepdims=True))
  o = (s / s.sum(-1, keepdims=True)) @ v
  o = o.transpose(0, 2, 1, 3).reshape(b, l, d)
  x = x + _np_dense(_np_ln(o, a["inner_attn_ln"][br]), a["out_proj"][br])
  f = p["ffn"][br]
  h = _np_dense(_np_ln(x, p["final_layer_norm"][br]), f["fc1"])
  h = 0.5 * h * (1 + scipy.special.erf(h / np.sqrt(2)))
  return x + _np_dense(_np_ln(h, f["ffn_layernorm"]), f["fc2"])


def _np_towers(params, cfg, x, pad, br):
  """Positions from row 2, zero padded rows, bottom stack (branch br), top stack (branch A)."""
  enc = params["backbone"]["encoder"]
  x = x + enc["embed_positions"][br]["embedding"][2:x.shape[1] + 2]
  for stack, branch in ((enc, br), (params["backbone_vl"], "A")):
    if pad is not None:
      x = x * (1 - pad[..., None])
    for i in range(len(stack["layers"])):
      x = _np_layer(x, pad, stack["layers"][i], branch, cfg.heads)
    x = _np_ln(x, stack["layer_norm"][branch])
  return x[:, 0]


def _np_encode_image(params, cfg, images):
  b, hgt, _, _ = images.shape
  p, n = cfg.patch_size, hgt // cfg.patch_size
  emb = params["backbone"]["vision_embed"]
  patches = images.reshape(b, n, p, n, p, 3).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(b, n * n, p * p * 3)  # each patch flattened as (row, column, channel)
  x = patches @ emb["proj"]["kernel"].reshape(p * p * 3, -1) + emb["proj"]["bias"]
  x = np.concatenate([np.broadcast_to(emb["cls_token"], (b, 1, x.shape[-1])), x], axis=1)
  z = _np_towers(params, cfg, x, None, "A") @ params["itc_vl_image_proj"]["fc"]["kernel"]
  return z / np.linalg.norm(z, axis=-1, keepdims=True)


def _np_encode_text(params, cfg, ids, mask):
  x = params["backbone"]["text_embed"]["embedding"][ids]
  z = _np_towers(params, cfg, x, 1 - mask, "B") @ params["itc_vl_text_proj"]["fc"]["kernel"]
  return z / np.linalg.norm(z, axis=-1, keepdims=True)


def _np_params(model):
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


# --- Tests. --------------------------------------------------------------------------------------

def test_numpy_parity(model):
  cfg = model.cfg
  images, ids, mask = _inputs(cfg)
  params = _np_params(model)
  want_img = _np_encode_image(params, cfg, np.asarray(images, np.float64))
  want_txt = _np_encode_text(params, cfg, np.asarray(ids), np.asarray(mask))
  np.testing.assert_allclose(_image(model, images), want_img, atol=1e-5)
  np.testing.assert_allclose(_text(model, ids, mask), want_txt, atol=1e-5)


def test_shapes_and_unit_norm(model):
  cfg = model.cfg
  zimg, ztxt = _forward(model, *_inputs(cfg))
  for z in (zimg, ztxt):
    assert z.shape == (3, cfg.out_dim) and z.dtype == jnp.float32
    np.testing.assert_allclose(jnp.linalg.norm(z, axis=-1), 1.0, atol=1e-5)
  assert model.logit_scale[...].shape == ()
  np.testing.assert_allclose(model.logit_scale[...], np.log(1 / 0.07), rtol=1e-6)


def test_text_ignores_padding(model):
  _, ids, mask = _inputs(model.cfg)
  base = _text(model, ids, mask)
  longer_ids = jnp.pad(ids, ((0, 0), (0, 4)), constant_values=7)
  longer_mask = jnp.pad(mask, ((0, 0), (0, 4)))
  np.testing.assert_allclose(_text(model, longer_ids, longer_mask), base, atol=1e-6)
  other_ids = jnp.where(mask.astype(bool), ids, (ids + 5) % model.cfg.vocab_size)
  np.testing.assert_allclose(_text(model, other_ids, mask), base, atol=1e-6)


def test_all_padded_text_is_finite(model):
  _, ids, _ = _inputs(model.cfg)
  assert np.isfinite(_text(model, ids, jnp.zeros_like(ids))).all()


def _perturbed(model, pred):
  """A copy of `model` with every Param whose path satisfies `pred` shifted."""
  other = nnx.clone(model)
  state = nnx.state(other, nnx.Param)
  for path, var in nnx.to_flat_state(state):
    if pred(path):
      var[...] = var[...] + 0.5
  nnx.update(other, state)
  return other


def test_towers_use_disjoint_bottom_weights(model):
  images, ids, mask = _inputs(model.cfg)
  bottom = lambda br: lambda p: p[:2] == ("backbone", "encoder") and br in p
  zimg, ztxt = _forward(model, images, ids, mask)
  text_moved = _perturbed(model, bottom("B"))
  np.testing.assert_array_equal(_image(text_moved, images), _image(model, images))
  assert not np.allclose(_text(text_moved, ids, mask), ztxt)
  image_moved = _perturbed(model, bottom("A"))
  np.testing.assert_array_equal(_text(image_moved, ids, mask), _text(model, ids, mask))
  assert not np.allclose(_image(image_moved, images), zimg)


def test_every_param_has_logical_names(model):
  state = nnx.state(model, nnx.Param)
  specs = dict(nnx.to_flat_state(nnx.get_partition_spec(state)))
  for path, var in nnx.to_flat_state(state):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var[...].ndim, (path, names)
    assert set(names) <= AXIS_NAMES, (path, names)
    spec = specs[path]
    spec = spec.get_value() if isinstance(spec, nnx.Variable) else spec
    assert isinstance(spec, jax.sharding.PartitionSpec) and tuple(spec) == tuple(names), path


# Released sizes (docs/m2_encoder.md) and the exact counts this implementation gives.
@pytest.mark.parametrize("variant, released, ours, in_checkpoint", [
    ("0.4B", 0.26e9, 240_228_865, 262_697_474),
    ("1B", 0.73e9, 689_444_865, 729_364_482),
    ("10B", 10.2e9, 9_552_551_937, 10_165_215_234),
])
def test_param_counts(variant, released, ours, in_checkpoint):
  cfg = m2_encoder.config_for(variant)
  total = m2_encoder.checkpoint_param_count(cfg)
  assert abs(total - released) / released < 0.02
  assert (m2_encoder.count_params(cfg), total) == (ours, in_checkpoint)


def test_remat_matches():
  cfg = _cfg(depth=1)  # compile time grows with depth
  rng = np.random.default_rng(0)
  params = nnx.state(_with_params(cfg, lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype)))
  plain = _with_params(cfg, params)
  remat = _with_params(dataclasses.replace(cfg, remat=True), params)
  images, ids, mask = _inputs(cfg)
  np.testing.assert_allclose(_image(remat, images), _image(plain, images), atol=1e-6)

  # Gradients through the text tower only (both stacks, padding masks): a backward pass is the
  # slowest thing in this file to compile, and the image tower runs the same layer code.
  def value_and_grad(model):
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
      ztxt = nnx.merge(graphdef, params).encode_text(ids, mask)
      return jnp.sum(ztxt * jnp.arange(ztxt.size, dtype=jnp.float32).reshape(ztxt.shape))

    return jax.jit(jax.value_and_grad(loss), compiler_options=FAST_COMPILE)(params)

  want_loss, want = value_and_grad(plain)
  got_loss, got = value_and_grad(remat)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)
  assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(got))


def test_bfloat16_compute_close_to_float32(model):
  inputs = _inputs(model.cfg)
  bf16 = _with_params(dataclasses.replace(model.cfg, dtype="bfloat16"), nnx.state(model, nnx.Param))
  for g, w in zip(_forward(bf16, *inputs), _forward(model, *inputs)):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, w, atol=5e-2)


def test_config_checks():
  assert set(m2_encoder.VARIANTS) == {"tiny", "0.4B", "1B", "10B"}
  cfg = m2_encoder.config_for("tiny", vocab_size=1000, image_size=48)
  assert (cfg.width, cfg.heads, cfg.depth, cfg.vl_depth, cfg.patch_size) == (128, 4, 2, 1, 8)
  assert cfg.ln_eps == 1e-5 and cfg.dtype == jnp.float32 and not cfg.remat
  with pytest.raises(ValueError):
    m2_encoder.config_for("huge")
  with pytest.raises(ValueError):
    m2_encoder.config_for("tiny", heads=5)
