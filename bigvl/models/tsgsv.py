"""TSGSV's model (arXiv 2308.07102, the authors' "TPN"): temporal sentence grounding in a stream,
scoring each frame of a short window from the window, a compressed long memory of the past and
the query, never a future frame.

  video in     per-frame features → Linear → LayerNorm → GELU (one projection for every memory)
  text         token embedding + positions → bidirectional blocks → norm: query tokens Q and
               their masked mean q̄ (the authors: BERT features → BiGRU; here one small encoder
               from the shared layers)
  compressor   `compress` stages (16, 16): X (B, T, h) → (B, n, h) with
                 F_v = softmax_T(MLP_v(X))ᵀ X                      visual pooling
                 F_q = softmax_T(w · tanh(W_f X + W_q q̄))ᵀ X       query-conditioned pooling
                 out = LN(g_v(mean_T X) · F_v + g_q(q̄) · F_q)       g = GELU(tanh(MLP(·))) scalars
               padded frames are masked out of both softmaxes and the mean; stage 2 reads stage 1's
               tokens; sinusoidal positions on the memory first
  decoder      the short window (+ sinusoidal positions) through causal blocks that cross-attend
               to the compressed long memory
  head         per channel c ∈ (start, end, inside): 16 · cos(W_v,c x_t, W_q,c q̄)
  TwinNet      (training only, `twin`) the future memory, flipped in time, through the same
               compressors; a forward block (causal, to the long memory) over the decoder's output,
               an inverted block (causal in flipped time, to the compressed future) over its flip,
               x = fwd + flip(inv), then a fusion block (bidirectional, to [long; future]) and a
               head of its own: the twin that sees the future and teaches the main branch
Blocks are the shared pre-LN ones (`layers/block.py`; the authors' are post-LN, dropout 0.5).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigvl.models.layers.attention import MASK_VALUE, Attention
from bigvl.models.layers.block import Block
from bigvl.models.layers.factories import Linears
from bigvl.models.layers.init import param, partitioned, trunc_normal
from bigvl.models.layers.mlp import MLP
from bigvl.models.layers.stack import run_layers

COS_SCALE = 16.0


@dataclasses.dataclass(frozen=True)
class TSGSVConfig:
  feature_dim: int
  vocab_size: int
  max_len: int = 24                  # query tokens
  width: int = 128
  heads: int = 4
  mlp_dim: int = 256
  text_depth: int = 2
  decoder_depth: int = 2
  compress: tuple[int, ...] = (16, 16)
  long: int = 64
  short: int = 8
  future: int = 64
  twin: bool = True
  init_std: float = 0.02
  dtype: str = "float32"
  attention: str = "xla"


def sinusoid(length: int, width: int) -> np.ndarray:
  """The fixed sinusoidal position table (length, width) of "Attention is all you need"."""
  pos = np.arange(length)[:, None]
  i = np.arange(width // 2)[None]
  angle = pos / np.power(10000.0, 2 * i / width)
  out = np.zeros((length, width), np.float32)
  out[:, 0::2], out[:, 1::2] = np.sin(angle), np.cos(angle)
  return out


def masked_softmax_pool(logits: jax.Array, x: jax.Array, mask: jax.Array) -> jax.Array:
  """logits (B, T, n), x (B, T, h), mask (B, T) → (B, n, h): softmax over T of the real frames
  (a row with none pools to zeros)."""
  m = mask.astype(bool)[:, :, None]
  a = jax.nn.softmax(jnp.where(m, logits.astype(jnp.float32), MASK_VALUE), axis=1)
  a = jnp.where(m, a, 0.0)
  return jnp.einsum("btn,btd->bnd", a, x.astype(jnp.float32))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  m = mask.astype(jnp.float32)[..., None]
  return jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


class Gate(nnx.Module):
  """g(z) = GELU(tanh(Linear(GELU(Linear(z))))), one scalar per row."""

  def __init__(self, width: int, make: Linears):
    self.fc1 = make.linear(width, 2 * width, ("embed", "mlp"))
    self.fc2 = make.linear(2 * width, 1, ("mlp", None))

  def __call__(self, z: jax.Array) -> jax.Array:
    return jax.nn.gelu(jnp.tanh(self.fc2(jax.nn.gelu(self.fc1(z)))), approximate=False)


class Compressor(nnx.Module):
  """One language-guided compression stage: (B, T, h) → (B, n, h) (module docstring)."""

  def __init__(self, width: int, tokens: int, make: Linears):
    self.visual = MLP(width, width, linear=make.linear)
    self.visual_out = make.linear(width, tokens, ("embed", None))
    self.w_f = make.linear(width, width, ("embed", "mlp"))
    self.w_q = make.linear(width, width, ("embed", "mlp"), use_bias=False)
    self.w_a = make.linear(width, tokens, ("mlp", None), use_bias=False)
    self.gate_v = Gate(width, make)
    self.gate_q = Gate(width, make)
    self.tokens = tokens

  def __call__(self, x: jax.Array, mask: jax.Array, q: jax.Array) -> jax.Array:
    f_v = masked_softmax_pool(self.visual_out(self.visual(x)), x, mask)
    e = jnp.tanh(self.w_f(x) + self.w_q(q)[:, None])
    f_q = masked_softmax_pool(self.w_a(e), x, mask)
    g_v = self.gate_v(masked_mean(x.astype(jnp.float32), mask))[:, :, None]
    g_q = self.gate_q(q)[:, :, None]
    y = g_v * f_v + g_q * f_q
    mu = jnp.mean(y, -1, keepdims=True)
    var = jnp.mean(jnp.square(y - mu), -1, keepdims=True)
    return (y - mu) * jax.lax.rsqrt(var + 1e-5)          # LayerNorm without affine


class Head(nnx.Module):
  """logits (B, S, 3) = 16 · cos(W_v,c x_t, W_q,c q̄) per channel c."""

  def __init__(self, width: int, make: Linears):
    self.video = make.linear(width, 3 * width, ("embed", "mlp"))
    self.query = make.linear(width, 3 * width, ("embed", "mlp"))

  def __call__(self, x: jax.Array, q: jax.Array) -> jax.Array:
    b, s, h = x.shape
    v = self.video(x).astype(jnp.float32).reshape(b, s, 3, h)
    t = self.query(q).astype(jnp.float32).reshape(b, 1, 3, h)
    v = v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, -1, keepdims=True), 1e-12))
    t = t * jax.lax.rsqrt(jnp.maximum(jnp.sum(t * t, -1, keepdims=True), 1e-12))
    return COS_SCALE * jnp.sum(v * t, -1)


class TSGSVModel(nnx.Module):
  def __init__(self, cfg: TSGSVConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    w, dt = cfg.width, jnp.dtype(cfg.dtype)
    make = Linears(rngs, dtype=dt, kernel_init=lambda gain: trunc_normal(cfg.init_std, gain))

    def attn(mode: str) -> Attention:
      return Attention(w, num_heads=cfg.heads, mode=mode, linear=make.linear, impl=cfg.attention)

    def block(causal: bool = False, cross: bool = False) -> Block:
      return Block(w, attention=attn, mlp=lambda: MLP(w, cfg.mlp_dim, linear=make.linear),
                   norm=make.norm, causal=causal, cross=cross)

    self.video_in = make.linear(cfg.feature_dim, w, ("mlp", "embed"))
    self.video_norm = make.norm(w)
    self.word_embed = nnx.Embed(cfg.vocab_size, w, dtype=dt,
                                embedding_init=partitioned(trunc_normal(cfg.init_std),
                                                           ("vocab", "embed")), rngs=rngs)
    self.text_pos = param(trunc_normal(cfg.init_std)(rngs.params(), (cfg.max_len, w)),
                          ("position", "embed"))
    self.text_blocks = nnx.List([block() for _ in range(cfg.text_depth)])
    self.text_norm = make.norm(w)
    self.compressors = nnx.List([Compressor(w, n, make) for n in cfg.compress])
    self.decoder = nnx.List([block(causal=True, cross=True) for _ in range(cfg.decoder_depth)])
    self.decoder_norm = make.norm(w)
    self.head = Head(w, make)
    if cfg.twin:
      self.twin_forward = block(causal=True, cross=True)
      self.twin_inverse = block(causal=True, cross=True)
      self.twin_fusion = block(cross=True)
      self.twin_norm = make.norm(w)
      self.twin_head = Head(w, make)
    self.dtype = dt

  # ------------------------------------------------------------------ parts
  def encode_query(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """(B, L) tokens → q̄ (B, h): the masked mean of the query encoder's states."""
    n = ids.shape[1]
    if n > self.cfg.max_len:
      raise ValueError(f"{n} query tokens > the model's {self.cfg.max_len} positions")
    x = self.word_embed(ids) + self.text_pos[...][None, :n]
    key_mask = mask.astype(bool)
    x = run_layers(self.text_blocks, x.astype(self.dtype),
                   lambda blk, h, m: blk(h, key_mask=m), key_mask)
    return masked_mean(self.text_norm(x).astype(jnp.float32), mask)

  def embed_frames(self, feats: jax.Array, mask: jax.Array) -> jax.Array:
    x = jax.nn.gelu(self.video_norm(self.video_in(feats.astype(self.dtype))), approximate=False)
    return x * mask.astype(x.dtype)[..., None]

  def compress(self, memory: jax.Array, mask: jax.Array, q: jax.Array) -> jax.Array:
    """(B, T, h) memory + positions → (B, n, h) through the stages."""
    x = memory + jnp.asarray(sinusoid(memory.shape[1], memory.shape[2]), memory.dtype)[None]
    m = mask
    for stage in self.compressors:
      x = stage(x, m, q)
      m = jnp.ones(x.shape[:2], jnp.int32)
    return x

  def _decode(self, blocks, x, mask, context) -> jax.Array:
    key_mask = mask.astype(bool)
    return run_layers(blocks, x, lambda blk, h, m: blk(h, key_mask=m, context=context), key_mask)

  # ------------------------------------------------------------------ forward
  def __call__(self, feats: jax.Array, mask: jax.Array, ids: jax.Array, text_mask: jax.Array,
               *, twin: bool = False) -> dict[str, jax.Array]:
    """feats (B, M + S [+ F], D), mask (B, M + S [+ F]) (module docstring of the grounding
    format), query ids / mask (B, L) → {"logits": (B, S, 3)[, "twin_logits": (B, S, 3)]}."""
    cfg = self.cfg
    m_len, s_len = cfg.long, cfg.short
    q = self.encode_query(ids, text_mask)
    x = self.embed_frames(feats, mask)
    long_x, long_m = x[:, :m_len], mask[:, :m_len]
    short_x, short_m = x[:, m_len:m_len + s_len], mask[:, m_len:m_len + s_len]
    long_c = self.compress(long_x, long_m, q)
    pe = jnp.asarray(sinusoid(s_len, short_x.shape[2]), short_x.dtype)[None]
    h = short_x + pe
    out = self.decoder_norm(self._decode(self.decoder, h, short_m, long_c))
    result = {"logits": self.head(out, q)}
    if twin:
      if not cfg.twin:
        raise ValueError("this model has no twin branch (model.twin=False)")
      if feats.shape[1] < m_len + s_len + cfg.future:
        raise ValueError(f"the twin needs the future memory: {feats.shape[1]} frames < "
                         f"{m_len + s_len + cfg.future}")
      fut_x = x[:, m_len + s_len:m_len + s_len + cfg.future][:, ::-1]
      fut_m = mask[:, m_len + s_len:m_len + s_len + cfg.future][:, ::-1]
      fut_c = self.compress(fut_x, fut_m, q)
      fwd = self.twin_forward(out + pe, key_mask=short_m.astype(bool), context=long_c)
      inv = self.twin_inverse(out[:, ::-1] + pe, key_mask=short_m[:, ::-1].astype(bool),
                              context=fut_c)
      y = fwd + inv[:, ::-1]
      y = self.twin_fusion(y, key_mask=short_m.astype(bool),
                           context=jnp.concatenate([long_c, fut_c], axis=1))
      result["twin_logits"] = self.twin_head(self.twin_norm(y), q)
    return result
