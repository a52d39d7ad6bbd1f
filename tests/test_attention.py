"""The attention implementations of `model.attention` agree, padding masks included.

The cuDNN kernel cannot run on CPU; its call site is checked by routing the same call (key lengths
instead of a mask) to JAX's XLA implementation, which honours lengths the way cuDNN does.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigvl.models import m2_encoder
from bigvl.models.layers import attention as attn

CPU_IMPLS = ("xla", "jax", "jax_xla")


def _qkv(dtype, b=3, l=11, h=4, d=16, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (b, l, h, d)) * d ** -0.5
  k = jax.random.normal(kk, (b, l, h, d))
  v = jax.random.normal(kv, (b, l, h, d))
  # Right-padded as the tokenizer pads: full, 4 real tokens, only [CLS].
  mask = jnp.arange(l)[None] < jnp.array([l, 4, 1])[:, None]
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), mask


def _reference(q, k, v, mask):
  """float64 NumPy softmax attention over the real keys."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k)
  logits = np.where(np.asarray(mask)[:, None, None, :], logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_implementations_match_reference_with_padding(impl, dtype, tol):
  q, k, v, mask = _qkv(dtype)
  for m, ref_mask in ((mask, mask), (None, jnp.ones_like(mask))):
    got = jax.jit(attn.dot_product_attention, static_argnums=4)(q, k, v, m, impl)
    assert got.dtype == dtype and got.shape == q.shape
    np.testing.assert_allclose(np.asarray(got, np.float32), _reference(q, k, v, ref_mask),
                               atol=tol, rtol=tol)


def test_scores_backward_multiplies_in_the_operand_dtype():
  q, k, _, _ = _qkv(jnp.float32)
  w = jax.random.normal(jax.random.key(3), (3, 4, 11, 11))

  def loss(scores):
    return lambda q, k: jnp.sum(scores(q, k) * w)
  plain = lambda q, k: jnp.einsum("bqhd,bkhd->bhqk", q, k)
  want = jax.grad(loss(plain), argnums=(0, 1))(q, k)
  got = jax.grad(loss(attn._scores), argnums=(0, 1))(q, k)            # float32: the same products
  for g, x in zip(got, want):
    np.testing.assert_allclose(g, x, rtol=1e-5, atol=1e-5)
  qb, kb = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
  grads = jax.grad(loss(attn._scores), argnums=(0, 1))(qb, kb)
  assert attn._scores(qb, kb).dtype == jnp.float32
  for g, x in zip(grads, want):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), x, rtol=5e-2, atol=5e-2)
  hlo = jax.jit(jax.grad(loss(attn._scores), argnums=(0, 1))).lower(qb, kb).as_text()
  operands = re.findall(r"stablehlo\.dot_general.*: \(tensor<(?:\d+x)*(\w+)>, tensor<(?:\d+x)*(\w+)>",
                        hlo)
  assert len(operands) == 2 and set(sum(operands, ())) == {"bf16"}   # dq, dk: nothing upcast


def _cudnn_on_xla(monkeypatch) -> list[dict]:
  """Runs implementation='cudnn' calls with JAX's XLA kernel; returns the recorded kwargs."""
  calls, real = [], jax.nn.dot_product_attention

  def fake(q, k, v, bias=None, mask=None, **kw):
    assert kw.pop("implementation") == "cudnn"
    calls.append({"mask": mask, **kw})
    assert mask is None and bias is None, "cuDNN gets padding as lengths, not as a dense mask"
    assert q.dtype in (jnp.bfloat16, jnp.float16)
    return real(q, k, v, implementation="xla", **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
  return calls


def test_cudnn_call_site_masks_padding_like_xla(monkeypatch):
  q, k, v, mask = _qkv(jnp.bfloat16)
  calls = _cudnn_on_xla(monkeypatch)
  got = attn.dot_product_attention(q, k, v, mask, "cudnn")
  assert calls and calls[0]["key_value_seq_lengths"].tolist() == [11, 4, 1]
  assert calls[0]["scale"] == 1.0   # q is scaled in the layer, as in the reference
  want = attn.dot_product_attention(q, k, v, mask, "xla")
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2)


def _model(cfg):
  init = jax.jit(lambda: nnx.state(m2_encoder.M2Encoder(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  return init()


def _encode(cfg, params, images, ids, mask):
  def run(p, *args):
    model = nnx.eval_shape(lambda: m2_encoder.M2Encoder(cfg, rngs=nnx.Rngs(0)))
    nnx.update(model, p)
    return model(*args)
  return jax.jit(run)(params, images, ids, mask)


@pytest.mark.parametrize("impl", ["jax", "cudnn"])
def test_model_outputs_match_across_implementations(impl, monkeypatch):
  if impl == "cudnn":
    _cudnn_on_xla(monkeypatch)
  base = m2_encoder.config_for(
      "tiny", vocab_size=64, image_size=16, patch_size=8, text_positions=16, width=32, heads=4,
      mlp_dim=64, out_dim=16, depth=2, vl_depth=1, dtype="bfloat16")
  params = _model(base)
  k1, k2 = jax.random.split(jax.random.key(1))
  images = jax.random.uniform(k1, (3, 16, 16, 3), minval=-1, maxval=1)
  ids = jax.random.randint(k2, (3, 9), 1, 64, dtype=jnp.int32)
  mask = (jnp.arange(9)[None] < jnp.array([9, 3, 1])[:, None]).astype(jnp.int32)
  want = _encode(base, params, images, ids, mask)
  got = _encode(dataclasses.replace(base, attention=impl), params, images, ids, mask)
  for g, w in zip(got, want):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, w, atol=2e-2)


def test_choices_are_checked_when_the_config_is_made():
  with pytest.raises(ValueError, match="one of"):
    m2_encoder.config_for("tiny", vocab_size=64, attention="flash")
  with pytest.raises(ValueError, match="bfloat16"):
    m2_encoder.config_for("tiny", vocab_size=64, attention="cudnn")   # float32 compute
  m2_encoder.config_for("tiny", vocab_size=64, attention="cudnn", dtype="bfloat16")
