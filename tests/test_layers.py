"""The shared layers (`bigvl.models.layers`) against NumPy oracles, and decoding with a KV cache
against the full causal forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigvl.models.layers import attention as attn
from bigvl.models.layers.adapters import BottleneckAdapter, LoRA
from bigvl.models.layers.attention import Attention, dot_product_attention
from bigvl.models.layers.block import Block
from bigvl.models.layers.factories import Linears
from bigvl.models.layers.init import trunc_normal
from bigvl.models.layers.mlp import MLP
from bigvl.models.layers.norms import RMSNorm
from bigvl.models.layers.rotary import apply_rotary
from bigvl.models.layers.stack import run_layers
from bigvl.models.layers.vit import ViT

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _make(seed=0, **kw) -> Linears:
  # A wide init so that every weight visibly changes the outputs.
  return Linears(nnx.Rngs(seed), kernel_init=lambda gain: trunc_normal(0.6, gain), **kw)


def _np(a) -> np.ndarray:
  return np.asarray(a, np.float64)


def _np_linear(lin, x):
  y = _np(x) @ _np(lin.kernel[...])
  return y if lin.bias is None else y + _np(lin.bias[...])


def _np_attention(layer: Attention, x, source, allowed):
  """softmax(q kᵀ/√d + mask) v through the layer's own projections, in float64.

  allowed: (B, Lq, Lk) bool."""
  b, lq, _ = x.shape
  h, d = layer.num_heads, layer.head_dim
  q = _np_linear(layer.q_proj, x).reshape(b, lq, h, d)
  k = _np_linear(layer.k_proj, source).reshape(b, source.shape[1], -1, d)
  v = _np_linear(layer.v_proj, source).reshape(b, source.shape[1], -1, d)
  k, v = (np.repeat(t, h // t.shape[2], axis=2) for t in (k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
  logits = np.where(np.asarray(allowed)[:, None], logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  out = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v).reshape(b, lq, h * d)
  return _np_linear(layer.out_proj, out)


def _inputs(b, l, width, seed):
  return jax.random.normal(jax.random.key(seed), (b, l, width))


LENGTHS = np.array([7, 3, 1])      # right-padded: full, 3 real tokens, only the first


def _padding(l):
  return jnp.asarray(np.arange(l)[None] < LENGTHS[:, None])


def test_bidirectional_attention_with_padding_matches_numpy():
  layer = Attention(16, num_heads=4, linear=_make().linear)
  x, mask = _inputs(3, 7, 16, 1), _padding(7)
  got = layer(x, key_mask=mask)
  want = _np_attention(layer, x, x, np.broadcast_to(np.asarray(mask)[:, None], (3, 7, 7)))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_causal_attention_matches_numpy():
  layer = Attention(16, num_heads=4, mode="causal", linear=_make().linear)
  x = _inputs(3, 7, 16, 2)
  tril = np.tril(np.ones((7, 7), bool))
  np.testing.assert_allclose(layer(x), _np_attention(layer, x, x, np.broadcast_to(tril, (3, 7, 7))),
                             atol=1e-5, rtol=1e-5)


def test_cross_attention_with_padded_context_matches_numpy():
  layer = Attention(16, num_heads=2, mode="cross", kv_width=24, linear=_make().linear)
  x, context, mask = _inputs(3, 5, 16, 3), _inputs(3, 7, 24, 4), _padding(7)
  got = layer(x, context=context, key_mask=mask)
  want = _np_attention(layer, x, context, np.broadcast_to(np.asarray(mask)[:, None], (3, 5, 7)))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # Padded context tokens are invisible: changing them changes nothing.
  noisy = jnp.where(mask[..., None], context, 100.0)
  np.testing.assert_allclose(layer(x, context=noisy, key_mask=mask), got, atol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "jax", "jax_xla"])
def test_grouped_kv_heads_equal_repeating_them_by_hand(impl):
  ks = jax.random.split(jax.random.key(5), 3)
  q = jax.random.normal(ks[0], (2, 6, 8, 4)) * 0.5
  k, v = (jax.random.normal(key, (2, 6, 2, 4)) for key in ks[1:])
  mask = jnp.asarray(np.arange(6)[None] < np.array([[6], [2]]))
  got = dot_product_attention(q, k, v, mask, impl, causal=True)
  k4, v4 = (jnp.repeat(t, 4, axis=2) for t in (k, v))        # query head n reads kv head n // 4
  want = dot_product_attention(q, k4, v4, mask, "xla", causal=True)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # ...and not any other assignment of query heads to kv heads.
  other = dot_product_attention(q, jnp.tile(k, (1, 1, 4, 1)), jnp.tile(v, (1, 1, 4, 1)), mask,
                                "xla", causal=True)
  assert np.abs(np.asarray(got - other)).max() > 1e-2


class TinyDecoder(nnx.Module):
  """Embedding, causal blocks (rotary, grouped kv heads, SwiGLU, RMSNorm), LM head."""

  def __init__(self, rngs: nnx.Rngs, vocab=32, width=32, depth=2):
    make = Linears(rngs, kernel_init=lambda gain: trunc_normal(0.5, gain), norm_kind="rms")
    self.embed = nnx.Embed(vocab, width, rngs=rngs)
    self.blocks = nnx.List([
        Block(width, norm=make.norm, causal=True,
              attention=lambda mode: Attention(width, num_heads=4, num_kv_heads=2, mode=mode,
                                               linear=make.linear, qkv_bias=False,
                                               rotary_base=100.0),
              mlp=lambda: MLP(width, 64, linear=make.linear, activation="silu", gated=True))
        for _ in range(depth)])
    self.norm = make.norm(width)
    self.head = make.linear(width, vocab, ("embed", "vocab"), use_bias=False)

  def init_cache(self, batch: int, max_len: int) -> None:
    for block in self.blocks:
      block.self_attn.init_cache(batch, max_len, jnp.float32)

  def __call__(self, ids: jax.Array) -> jax.Array:
    x = self.embed(ids)
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))


def _decode(model: TinyDecoder, ids: jax.Array, prefill: int) -> jax.Array:
  """Logits of every position: `prefill` tokens in one call, then one token per (jitted) call."""
  model.init_cache(ids.shape[0], ids.shape[1] + 2)
  step = nnx.jit(lambda m, x: m(x))
  out = [step(model, ids[:, :prefill])] if prefill else []
  out += [step(model, ids[:, t:t + 1]) for t in range(prefill, ids.shape[1])]
  return jnp.concatenate(out, axis=1)


@pytest.fixture(scope="module")
def decoder_and_ids():
  ids = jax.random.randint(jax.random.key(7), (2, 9), 0, 32)
  model = TinyDecoder(nnx.Rngs(0))
  return model, ids, model(ids)


@pytest.mark.parametrize("prefill", [0, 4])
def test_decoding_with_the_kv_cache_equals_the_full_causal_forward(decoder_and_ids, prefill):
  model, ids, full = decoder_and_ids
  model = nnx.clone(model)
  got = _decode(model, ids, prefill)
  np.testing.assert_allclose(got, full, atol=1e-5, rtol=1e-5)
  assert int(model.blocks[0].self_attn.cache_index[...]) == ids.shape[1]


@pytest.mark.parametrize("bug", ["sees_an_empty_slot", "misses_itself", "positions_stand_still"])
def test_the_comparison_catches_a_wrong_cache(decoder_and_ids, monkeypatch, bug):
  model, ids, full = decoder_and_ids
  if bug == "positions_stand_still":
    real = attn.apply_rotary
    monkeypatch.setattr(attn, "apply_rotary",
                        lambda x, positions, base: real(x, 0 * positions, base))
  else:
    off = {"sees_an_empty_slot": 1, "misses_itself": -1}[bug]
    monkeypatch.setattr(attn, "decode_mask", lambda index, q_len, max_len: (
        jnp.arange(max_len)[None, :] <= index + off + jnp.arange(q_len)[:, None])[None, None])
  got = _decode(nnx.clone(model), ids, 0)
  assert np.abs(np.asarray(got - full)).max() > 1e-3


def test_rotary_products_depend_only_on_the_position_difference():
  q, k = jax.random.normal(jax.random.key(8), (2, 1, 1, 1, 16))
  def dot(m, n):
    return float(jnp.sum(apply_rotary(q, jnp.array([m])) * apply_rotary(k, jnp.array([n]))))
  for diff in (0, 3, -5):
    want = dot(10 + diff, 10)
    for m in (0, 7, 123):
      np.testing.assert_allclose(dot(m + diff, m), want, rtol=1e-5, atol=1e-5)
  assert abs(dot(3, 0) - dot(0, 0)) > 1e-3                      # positions do matter
  np.testing.assert_allclose(jnp.linalg.norm(apply_rotary(q, jnp.array([57]))),
                             jnp.linalg.norm(q), rtol=1e-6)     # a rotation


def test_rms_norm_matches_numpy():
  norm = RMSNorm(8, eps=1e-6, dtype=jnp.bfloat16, param_dtype=jnp.float32)
  norm.scale[...] = jnp.linspace(0.5, 2.0, 8)
  x = jax.random.normal(jax.random.key(9), (3, 8)) * 5
  want = _np(x) / np.sqrt(np.mean(_np(x) ** 2, -1, keepdims=True) + 1e-6) * _np(norm.scale[...])
  got = norm(x)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2)
  norm32 = RMSNorm(8, eps=1e-6, dtype=jnp.float32, param_dtype=jnp.float32)
  norm32.scale[...] = norm.scale[...]
  np.testing.assert_allclose(norm32(x), want, rtol=1e-5, atol=1e-6)


def test_lora_starts_as_its_base_and_moves_with_b():
  make = _make()
  base = make.linear(8, 6, ("embed", "mlp"))
  lora = LoRA(base, 8, 6, rank=2, alpha=4.0, dropout_rate=0.5, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(10), (3, 8))
  np.testing.assert_array_equal(lora(x), base(x))
  lora.lora_b[...] = jax.random.normal(jax.random.key(11), (2, 6))
  want = _np_linear(base, x) + 2.0 * (_np(x) @ _np(lora.lora_a[...]) @ _np(lora.lora_b[...]))
  np.testing.assert_allclose(lora(x), want, rtol=1e-5, atol=1e-5)
  # Only the low-rank factors are LoRAParams: what a system trains with the base frozen.
  trainable = nnx.to_flat_state(nnx.state(lora, nnx.LoRAParam))
  assert sorted(path for path, _ in trainable) == [("lora_a",), ("lora_b",)]
  dropped = lora(x, rng=jax.random.key(12))
  assert np.abs(np.asarray(dropped - lora(x))).max() > 1e-3


def test_bottleneck_adapter_starts_as_the_identity():
  adapter = BottleneckAdapter(8, 3, rngs=nnx.Rngs(2), dropout_rate=0.5)
  x = jax.random.normal(jax.random.key(13), (2, 5, 8))
  np.testing.assert_array_equal(adapter(x), x)
  np.testing.assert_array_equal(adapter(x, rng=nnx.Rngs(dropout=0)), x)
  adapter.up[...] = jax.random.normal(jax.random.key(14), (3, 8))
  want = _np(x) + _np(x) @ _np(adapter.down[...]) @ _np(adapter.up[...])
  np.testing.assert_allclose(adapter(x), want, rtol=1e-5, atol=1e-5)
  a, b = adapter(x, rng=jax.random.key(15)), adapter(x, rng=jax.random.key(15))
  np.testing.assert_array_equal(a, b)                           # dropout is a function of the key
  assert np.abs(np.asarray(a - adapter(x))).max() > 1e-3


def test_decoder_block_cross_attention_ignores_padded_context():
  make = _make()
  block = Block(16, norm=make.norm, causal=True, cross=True,
                attention=lambda mode: Attention(16, num_heads=2, mode=mode, linear=make.linear,
                                                 kv_width=24 if mode == "cross" else None),
                mlp=lambda: MLP(16, 32, linear=make.linear))
  x, context, mask = _inputs(3, 4, 16, 16), _inputs(3, 7, 24, 17), _padding(7)
  y = block(x, context=context, context_mask=mask)
  assert y.shape == x.shape
  np.testing.assert_allclose(
      block(x, context=jnp.where(mask[..., None], context, -50.0), context_mask=mask), y, atol=1e-6)
  assert np.abs(np.asarray(block(x, context=context * 2, context_mask=mask) - y)).max() > 1e-3


def test_vit_shapes_and_finite_gradients():
  model = ViT(width=16, depth=2, heads=2, mlp_dim=32, patch_size=4, image_size=12,
              rngs=nnx.Rngs(0))
  images = jax.random.uniform(jax.random.key(18), (2, 12, 12, 3), minval=-1, maxval=1)
  cls, patches = model(images)
  assert cls.shape == (2, 16) and patches.shape == (2, 9, 16)

  def loss(m):
    cls, patches = m(images)
    return jnp.sum(cls ** 2) + jnp.mean(patches)
  grads = nnx.jit(nnx.grad(loss))(model)
  leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
  assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert float(jnp.abs(grads.patch_embed.cls_token[...]).max()) > 0


@pytest.mark.parametrize("remat", [False, True])
def test_scan_over_layers_equals_the_loop(remat):
  make = _make()
  blocks = nnx.List([Block(16, norm=make.norm,
                           attention=lambda mode: Attention(16, num_heads=2, mode=mode,
                                                            linear=make.linear),
                           mlp=lambda: MLP(16, 32, linear=make.linear)) for _ in range(3)])
  graphdef, state = nnx.split(blocks)
  x, mask = _inputs(3, 7, 16, 19), _padding(7)

  def loss(state, scan):
    call = lambda block, x, mask: block(x, key_mask=mask)
    y = run_layers(nnx.merge(graphdef, state), x, call, mask, remat=remat, remat_policy="dots",
                   scan=scan)
    return jnp.sum(y * jnp.arange(16)), y

  run = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1,
                compiler_options=FAST_COMPILE)
  (loop_loss, loop_y), loop_grads = run(state, False)
  (scan_loss, scan_y), scan_grads = run(state, True)
  np.testing.assert_allclose(scan_y, loop_y, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(scan_loss, loop_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4),
               scan_grads, loop_grads)
