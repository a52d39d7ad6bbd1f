"""Multi-head attention: the softmax(q·kᵀ)·v kernel and the `Attention` layer built on it.

The layer has three modes: "bidirectional" self-attention (keys masked by padding), "causal"
self-attention (a token sees itself and earlier tokens; with a KV cache for decoding), and "cross"
attention (queries from x, keys and values from a context with its own padding mask).

Its projections and norms come from factories (`bigvl.models.layers.init`), and any positional
"route" arguments after x are handed to them: Multiway passes the branch name ("A"/"B") that picks
one set of weights, plain models pass nothing. Attribute names are torchscale's (`q_proj`, `k_proj`,
`v_proj`, `out_proj`, `inner_attn_ln`), which is what released checkpoints use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bigvl.models.layers.init import LinearFactory, NormFactory
from bigvl.models.layers.rotary import apply_rotary

# Masked keys get this logit. The reference uses -inf, which turns a row whose keys are all masked
# into NaN; the most negative finite float32 gives exactly zero weight to masked keys whenever one
# visible key exists, and a finite (uniform) row otherwise.
MASK_VALUE = float(jnp.finfo(jnp.float32).min)

# How softmax(q·kᵀ)·v is computed (`model.attention`). All take q already scaled, keep the softmax
# statistics in float32 and agree within bf16 rounding (tests/test_attention.py).
ATTENTION = {
    "xla": "einsum → float32 softmax → einsum, as the reference; XLA fuses it (any platform); "
           "backward products in the compute dtype",
    "jax": "jax.nn.dot_product_attention, implementation chosen by JAX (XLA in jax 0.10)",
    "jax_xla": "jax.nn.dot_product_attention(implementation='xla'); its backward multiplies the "
               "scores' cotangent in float32",
    "cudnn": "jax.nn.dot_product_attention(implementation='cudnn'): cuDNN fused flash attention; "
             "NVIDIA GPUs (Ampere or later), bfloat16/float16 compute, head_dim <= 128 and a "
             "multiple of 8",
}

MODES = ("bidirectional", "causal", "cross")


def check_attention(impl: str, dtype, head_dim: int) -> None:
  """Fails at config time, not at the first step, for a choice that cannot run."""
  if impl not in ATTENTION:
    raise ValueError(f"attention={impl!r}: use one of {sorted(ATTENTION)}")
  if impl == "cudnn":
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"attention='cudnn' needs dtype bfloat16 or float16, not {jnp.dtype(dtype)}")
    if head_dim > 128 or head_dim % 8:
      raise ValueError(f"attention='cudnn' needs head_dim <= 128 and a multiple of 8, not {head_dim}")


@jax.custom_vjp
def _scores(q: jax.Array, k: jax.Array) -> jax.Array:
  """q·kᵀ per head, float32, from low-precision q and k; its backward multiplies in their dtype.

  Autodiff of a product with a float32 result would multiply the float32 cotangent with upcast
  operands: both backward products of every attention layer in float32 on a bfloat16 run.
  """
  return jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)


def _scores_fwd(q, k):
  return _scores(q, k), (q, k)


def _scores_bwd(res, g):
  q, k = res
  g = g.astype(q.dtype)
  dq = jnp.einsum("bhqk,bkhd->bqhd", g, k, preferred_element_type=jnp.float32)
  dk = jnp.einsum("bhqk,bqhd->bkhd", g, q, preferred_element_type=jnp.float32)
  return dq.astype(q.dtype), dk.astype(k.dtype)


_scores.defvjp(_scores_fwd, _scores_bwd)


def causal_mask(q_len: int, k_len: int) -> jax.Array:
  """(1, 1, q_len, k_len) bool: query i sees keys j <= i (queries and keys start together)."""
  return (jnp.arange(k_len)[None, :] <= jnp.arange(q_len)[:, None])[None, None]


def decode_mask(index: jax.Array, q_len: int, max_len: int) -> jax.Array:
  """(1, 1, q_len, max_len) bool for queries at cache slots index, ..., index + q_len - 1: each sees
  the filled slots up to its own, never the empty (zero) slots after it."""
  return (jnp.arange(max_len)[None, :] <= index + jnp.arange(q_len)[:, None])[None, None]


def _allowed(key_mask: jax.Array | None, mask: jax.Array | None) -> jax.Array | None:
  """One boolean mask broadcastable to (B, heads, Lq, Lk) from a key padding mask and a 4D mask."""
  allowed = None if key_mask is None else key_mask[:, None, None, :]
  if mask is not None:
    allowed = mask if allowed is None else allowed & mask
  return allowed


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          key_mask: jax.Array | None = None, impl: str = "xla", *,
                          causal: bool = False, mask: jax.Array | None = None) -> jax.Array:
  """softmax(q·kᵀ)·v; q carries the 1/sqrt(head_dim) scale.

  q: (B, Lq, heads, head_dim); k, v: (B, Lk, kv_heads, head_dim), kv_heads dividing heads (query
  head n uses kv head n // (heads / kv_heads), grouped-query attention).
  key_mask: (B, Lk) bool, True on real keys, or None. For "cudnn" it must be right-padded (real
  tokens first), as the tokenizer makes it: cuDNN takes it as per-example key lengths.
  causal: query i sees keys j <= i (Lq == Lk). mask: bool broadcastable to (B, heads, Lq, Lk), True
  where a query may see a key. The masks given are combined.
  """
  if causal and q.shape[1] != k.shape[1]:
    raise ValueError(f"causal attention needs as many queries as keys, not {q.shape[1]} and "
                     f"{k.shape[1]}; pass a `mask` (the KV cache does)")
  if impl == "xla":
    if causal:
      tril = causal_mask(q.shape[1], k.shape[1])
      mask = tril if mask is None else mask & tril
    if k.shape[2] != q.shape[2]:
      # Grouped kv heads: each is shared by heads/kv_heads query heads. Repeating them costs one
      # (B, Lk, heads, head_dim) copy per layer while it runs, not in the cache.
      k, v = (jnp.repeat(t, q.shape[2] // k.shape[2], axis=2) for t in (k, v))
    if q.dtype == jnp.float32:
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    else:
      logits = _scores(q, k)
    allowed = _allowed(key_mask, mask)
    if allowed is not None:
      logits = jnp.where(allowed, logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)
  if impl in ("jax", "jax_xla"):
    return jax.nn.dot_product_attention(
        q, k, v, mask=_allowed(key_mask, mask), scale=1.0, is_causal=causal,
        implementation=None if impl == "jax" else "xla")
  if impl == "cudnn":
    # cuDNN's flash kernel takes padding as lengths (a dense mask would be a bias tensor in HBM).
    lengths = None if key_mask is None else jnp.sum(key_mask, axis=-1, dtype=jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, key_value_seq_lengths=lengths,
                                        scale=1.0, is_causal=causal, implementation="cudnn")
  raise ValueError(f"attention={impl!r}: use one of {sorted(ATTENTION)}")


class Attention(nnx.Module):
  """Multi-head attention in one of `MODES`, optionally with Sub-LN, rotary positions, grouped kv
  heads and (causal mode) a KV cache for decoding.

  width: the width of x (queries) and of the output; kv_width: the context's width (cross mode);
  num_kv_heads: fewer kv heads than query heads (GQA, Llama); qkv_bias: biases on q, k, v;
  sub_ln: a norm between the head merge and `out_proj` (Magneto's `inner_attn_ln`);
  rotary_base: rotate q and k by their positions (self modes); init_gain: Magneto's gain on the
  initial v_proj and out_proj weights (q and k keep gain 1).
  """

  def __init__(self, width: int, *, num_heads: int, linear: LinearFactory,
               norm: NormFactory | None = None, mode: str = "bidirectional",
               head_dim: int | None = None, num_kv_heads: int | None = None,
               kv_width: int | None = None, qkv_bias: bool = True, out_bias: bool = True,
               sub_ln: bool = False, rotary_base: float | None = None, init_gain: float = 1.0,
               impl: str = "xla"):
    if mode not in MODES:
      raise ValueError(f"mode={mode!r}: use one of {MODES}")
    if kv_width is not None and mode != "cross":
      raise ValueError("kv_width is the context's width: cross mode only")
    if rotary_base is not None and mode == "cross":
      raise ValueError("rotary positions are for self-attention: a context has its own positions")
    self.mode = mode
    self.num_heads = num_heads
    self.head_dim = width // num_heads if head_dim is None else head_dim
    self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads "
                       f"{self.num_kv_heads}")
    self.rotary_base = rotary_base
    self.attention_impl = impl
    inner, kv_inner = num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    kv_in = width if kv_width is None else kv_width
    self.q_proj = linear(width, inner, ("embed", "heads"), use_bias=qkv_bias)
    self.k_proj = linear(kv_in, kv_inner, ("embed", "heads"), use_bias=qkv_bias)
    self.v_proj = linear(kv_in, kv_inner, ("embed", "heads"), gain=init_gain, use_bias=qkv_bias)
    self.out_proj = linear(inner, width, ("heads", "embed"), gain=init_gain, use_bias=out_bias)
    if sub_ln:
      if norm is None:
        raise ValueError("sub_ln needs a norm factory")
      self.inner_attn_ln = norm(inner)
    else:
      self.inner_attn_ln = None
    # Decoding state (`init_cache`): absent until asked for, so training graphs carry none. Data
    # slots (not static attributes) so that the cache may fill them later.
    self.cached_key: nnx.Cache | None = nnx.data(None)
    self.cached_value: nnx.Cache | None = nnx.data(None)
    self.cache_index: nnx.Cache | None = nnx.data(None)

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> None:
    """Empty keys and values for `max_len` tokens: the next calls decode, each appending its x."""
    if self.mode != "causal":
      raise ValueError(f"a KV cache is for causal attention, not {self.mode!r}")
    shape = (batch, max_len, self.num_kv_heads, self.head_dim)
    names = ("batch", "length", "heads", None)
    self.cached_key = nnx.Cache(jnp.zeros(shape, dtype), out_sharding=names, eager_sharding=False)
    self.cached_value = nnx.Cache(jnp.zeros(shape, dtype), out_sharding=names,
                                  eager_sharding=False)
    self.cache_index = nnx.Cache(jnp.zeros((), jnp.int32))

  def __call__(self, x: jax.Array, *route, key_mask: jax.Array | None = None,
               context: jax.Array | None = None, positions: jax.Array | None = None) -> jax.Array:
    """x: (B, L, width) → (B, L, width).

    key_mask: (B, Lk) bool, True on real keys: x's tokens (self modes), the context's (cross mode)
    or the cache slots (decoding). positions: (B, L) or (L,) integer positions of x for rotary;
    default 0, 1, ... (after the cache's filled slots when decoding).
    """
    if (context is not None) != (self.mode == "cross"):
      raise ValueError(f"{self.mode} attention {'needs' if context is None else 'takes no'} "
                       "context")
    b, l, _ = x.shape
    source = x if context is None else context
    # As in the reference, the scale multiplies q after its bias is added.
    q = self.q_proj(x, *route) * (self.head_dim ** -0.5)
    q = q.reshape(b, l, self.num_heads, self.head_dim)
    k = self.k_proj(source, *route).reshape(b, source.shape[1], self.num_kv_heads, self.head_dim)
    v = self.v_proj(source, *route).reshape(b, source.shape[1], self.num_kv_heads, self.head_dim)
    decoding = self.cached_key is not None
    if self.rotary_base is not None:
      if positions is None:
        positions = jnp.arange(l) + (self.cache_index[...] if decoding else 0)
      q = apply_rotary(q, positions, self.rotary_base)
      k = apply_rotary(k, positions, self.rotary_base)
    if decoding:
      k, v, mask = self._append(k, v)
      out = dot_product_attention(q, k, v, key_mask, self.attention_impl, mask=mask)
    else:
      out = dot_product_attention(q, k, v, key_mask, self.attention_impl,
                                  causal=self.mode == "causal")
    out = out.reshape(b, l, self.num_heads * self.head_dim)
    if self.inner_attn_ln is not None:
      out = self.inner_attn_ln(out, *route)
    return self.out_proj(out, *route)

  def weights(self, x: jax.Array, *route, queries: jax.Array | None = None,
              key_mask: jax.Array | None = None) -> jax.Array:
    """The softmax attention probabilities, float32 (B, heads, Lq, L), of `queries` (default: x)
    over x's tokens in a self mode: what this layer's __call__ would weight the values with
    (inspection, attentive masking). No cache, no rotary positions."""
    if self.mode == "cross" or self.rotary_base is not None:
      raise ValueError("weights() is for self-attention without rotary positions")
    queries = x if queries is None else queries
    b = x.shape[0]
    q = (self.q_proj(queries, *route) * (self.head_dim ** -0.5)).reshape(
        b, queries.shape[1], self.num_heads, self.head_dim)
    k = self.k_proj(x, *route).reshape(b, x.shape[1], self.num_kv_heads, self.head_dim)
    k = jnp.repeat(k, self.num_heads // self.num_kv_heads, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    if key_mask is not None:
      logits = jnp.where(key_mask[:, None, None, :], logits, MASK_VALUE)
    if self.mode == "causal":
      logits = jnp.where(causal_mask(queries.shape[1], x.shape[1]), logits, MASK_VALUE)
    return jax.nn.softmax(logits, axis=-1)

  def _append(self, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Writes this call's keys and values at the cache index; returns the whole cache and the mask
    of what each query may see."""
    index = self.cache_index[...]
    start = (0, index, 0, 0)
    keys, values = (jax.lax.dynamic_update_slice(cache[...], new.astype(cache[...].dtype), start)
                    for cache, new in ((self.cached_key, k), (self.cached_value, v)))
    self.cached_key[...] = keys
    self.cached_value[...] = values
    self.cache_index[...] = index + k.shape[1]
    return keys, values, decode_mask(index, k.shape[1], keys.shape[1])
