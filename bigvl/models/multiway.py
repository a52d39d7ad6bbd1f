"""Multiway (BEiT-3 / Magneto) transformer pieces: one set of weights per modality branch.

A Multiway module holds one copy of a sub-module per branch ("A" = vision, "B" = text) and the
caller picks the branch by name. M²-Encoder never mixes the modalities in one sequence, so unlike
the PyTorch reference there is no split position: a whole batch runs through one branch.

Attribute names follow the released PyTorch keys (`self_attn.q_proj.A`, `ffn.B.fc1`, ...) so that
the checkpoint name map is nearly the identity. The parameter leaves keep NNX's names and layouts:
Linear `kernel` is PyTorch `weight.T` (in, out); LayerNorm `scale` is PyTorch `weight`.

Every parameter carries logical axis names (see `bigvl.parallel.sharding`); placement is decided
later by a rules table, so variables are created unsharded (`eager_sharding=False`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bigvl.parallel.sharding import constrain

if TYPE_CHECKING:
  from bigvl.models.m2_encoder import M2Config

Initializer = Callable[..., jax.Array]

# Padded keys get this logit. The reference uses -inf, which turns a row whose keys are all padded
# into NaN; the most negative finite float32 gives exactly zero weight to padded keys whenever one
# real key exists, and a finite (uniform) row otherwise.
MASK_VALUE = float(jnp.finfo(jnp.float32).min)

BRANCHES = ("A", "B")

# `model.remat_policy`: what a rematerialised layer keeps from its forward pass for the backward
# pass (everything else is recomputed). "full" keeps only the layer's input: the least memory.
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

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


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None,
                          impl: str = "xla") -> jax.Array:
  """softmax(q·kᵀ)·v over (B, L, heads, head_dim) arrays; q carries the 1/sqrt(head_dim) scale.

  key_mask: (B, L) bool, True on real tokens, or None. For "cudnn" it must be right-padded (real
  tokens first), as the tokenizer makes it: cuDNN takes it as per-example key lengths.
  """
  if impl == "xla":
    if q.dtype == jnp.float32:
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    else:
      logits = _scores(q, k)
    if key_mask is not None:
      logits = jnp.where(key_mask[:, None, None, :], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)
  if impl in ("jax", "jax_xla"):
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=1.0, implementation=None if impl == "jax" else "xla")
  if impl == "cudnn":
    # cuDNN's flash kernel takes padding as lengths (a dense mask would be a bias tensor in HBM).
    lengths = None if key_mask is None else jnp.sum(key_mask, axis=-1, dtype=jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, scale=1.0,
                                        implementation="cudnn")
  raise ValueError(f"attention={impl!r}: use one of {sorted(ATTENTION)}")


def partitioned(init: Initializer, names: tuple[str | None, ...]) -> Initializer:
  """`init` whose Param records logical axis `names`; sharding is applied later, by rules."""
  return nnx.with_partitioning(init, names, eager_sharding=False)


def param(value: jax.Array, names: tuple[str | None, ...]) -> nnx.Param:
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


def trunc_normal(std: float, gain: float = 1.0) -> Initializer:
  """Normal(0, std) truncated to [-std, std], times `gain`.

  This is the BEiT-3 helper the reference carries (`trunc_normal_(std=0.02)` with a=-std, b=std):
  the cut is at one standard deviation and the variance is not corrected, so the effective std is
  about 0.54 * std.
  """

  def init(key, shape, dtype=jnp.float32):
    x = jax.random.truncated_normal(key, -1.0, 1.0, shape, jnp.float32)
    return (x * (std * gain)).astype(dtype)

  return init


def subln_gain(num_layers: int) -> float:
  """Magneto's Sub-LN init gain sqrt(log 2N) for fc1, fc2, out_proj and v_proj of an N-layer stack.

  Each stack uses its own depth: the reference builds `backbone_vl` after setting encoder_layers to
  the top depth, so N = depth for the bottom stack and N = vl_depth for the top stack.
  """
  return math.sqrt(math.log(2 * num_layers))


class Multiway(nnx.Module):
  """One sub-module per branch; `__call__(x, branch)` runs the named one."""

  def __init__(self, **branches: nnx.Module):
    unknown = set(branches) - set(BRANCHES)
    if unknown or not branches:
      raise ValueError(f"branches must be a non-empty subset of {BRANCHES}, got {sorted(branches)}")
    for name, module in branches.items():
      setattr(self, name, module)

  def __call__(self, x, branch: str):
    return getattr(self, branch)(x)


def multiway(make: Callable[[], nnx.Module], branches: Sequence[str]) -> Multiway:
  return Multiway(**{b: make() for b in branches})


class LayerNorm(nnx.Module):
  """LayerNorm whose statistics are always float32; the result is cast to `dtype`."""

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
    self.eps = eps
    self.dtype = dtype
    self.scale = param(jnp.ones((dim,), param_dtype), ("norm",))
    self.bias = param(jnp.zeros((dim,), param_dtype), ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


def linear(cfg: M2Config, d_in: int, d_out: int, names: tuple[str, str], rngs: nnx.Rngs,
           gain: float = 1.0, use_bias: bool = True, dtype=None) -> nnx.Linear:
  return nnx.Linear(
      d_in, d_out, use_bias=use_bias,
      dtype=cfg.dtype if dtype is None else dtype, param_dtype=cfg.param_dtype,
      kernel_init=partitioned(trunc_normal(cfg.init_std, gain), names),
      bias_init=partitioned(nnx.initializers.zeros, (names[1],)),
      rngs=rngs)


def layer_norm(cfg: M2Config, dim: int) -> LayerNorm:
  return LayerNorm(dim, eps=cfg.ln_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)


class MultiheadAttention(nnx.Module):
  """Self-attention with Sub-LN (`inner_attn_ln`) between the head merge and `out_proj`."""

  def __init__(self, cfg: M2Config, branches: Sequence[str], gain: float, rngs: nnx.Rngs):
    d = cfg.width
    self.num_heads = cfg.heads
    self.head_dim = d // cfg.heads
    self.attention_impl = cfg.attention
    self.q_proj = multiway(lambda: linear(cfg, d, d, ("embed", "heads"), rngs), branches)
    self.k_proj = multiway(lambda: linear(cfg, d, d, ("embed", "heads"), rngs), branches)
    self.v_proj = multiway(lambda: linear(cfg, d, d, ("embed", "heads"), rngs, gain), branches)
    self.out_proj = multiway(lambda: linear(cfg, d, d, ("heads", "embed"), rngs, gain), branches)
    self.inner_attn_ln = multiway(lambda: layer_norm(cfg, d), branches)

  def __call__(self, x: jax.Array, key_mask: jax.Array | None, branch: str) -> jax.Array:
    b, l, _ = x.shape
    split = lambda t: t.reshape(b, l, self.num_heads, self.head_dim)
    # As in the reference, the scale multiplies q after its bias is added.
    q = split(self.q_proj(x, branch) * (self.head_dim ** -0.5))
    k = split(self.k_proj(x, branch))
    v = split(self.v_proj(x, branch))
    out = dot_product_attention(q, k, v, key_mask, self.attention_impl)
    out = out.reshape(b, l, self.num_heads * self.head_dim)
    return self.out_proj(self.inner_attn_ln(out, branch), branch)


class FeedForwardNetwork(nnx.Module):
  """fc1 → exact GELU → Sub-LN (`ffn_layernorm`) → fc2."""

  def __init__(self, cfg: M2Config, gain: float, rngs: nnx.Rngs):
    self.fc1 = linear(cfg, cfg.width, cfg.mlp_dim, ("embed", "mlp"), rngs, gain)
    self.fc2 = linear(cfg, cfg.mlp_dim, cfg.width, ("mlp", "embed"), rngs, gain)
    self.ffn_layernorm = layer_norm(cfg, cfg.mlp_dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.gelu(self.fc1(x), approximate=False)
    h = constrain(h, ("batch", "length", "mlp"))
    return self.fc2(self.ffn_layernorm(h))


class EncoderLayer(nnx.Module):
  """Pre-LN block with Sub-LN inside both residual branches (Magneto)."""

  def __init__(self, cfg: M2Config, branches: Sequence[str], gain: float, rngs: nnx.Rngs):
    self.self_attn = MultiheadAttention(cfg, branches, gain, rngs)
    self.self_attn_layer_norm = multiway(lambda: layer_norm(cfg, cfg.width), branches)
    self.ffn = multiway(lambda: FeedForwardNetwork(cfg, gain, rngs), branches)
    self.final_layer_norm = multiway(lambda: layer_norm(cfg, cfg.width), branches)

  def __call__(self, x: jax.Array, key_mask: jax.Array | None, branch: str) -> jax.Array:
    x = x + self.self_attn(self.self_attn_layer_norm(x, branch), key_mask, branch)
    x = x + self.ffn(self.final_layer_norm(x, branch), branch)
    return constrain(x, ("batch", "length", "embed"))


class Encoder(nnx.Module):
  """A stack of Multiway layers and a final Multiway LayerNorm, optionally with learned positions.

  `embed_positions` (bottom stack only) holds one table per branch; position ids start at 2, the
  fairseq convention the reference keeps, so rows 0 and 1 are never read.
  """

  def __init__(self, cfg: M2Config, num_layers: int, branches: Sequence[str], rngs: nnx.Rngs,
               embed_positions: Multiway | None = None):
    gain = subln_gain(num_layers)
    self.remat = cfg.remat
    self.remat_policy = cfg.remat_policy
    self.scan_layers = cfg.scan_layers
    self.embed_positions = embed_positions
    self.layers = nnx.List([EncoderLayer(cfg, branches, gain, rngs) for _ in range(num_layers)])
    self.layer_norm = multiway(lambda: layer_norm(cfg, cfg.width), branches)

  def __call__(self, x: jax.Array, key_mask: jax.Array | None, branch: str) -> jax.Array:
    """x: (B, L, width); key_mask: (B, L) bool, True on real tokens, or None (no padding)."""
    if self.embed_positions is not None:
      positions = jnp.arange(2, x.shape[1] + 2)
      x = x + self.embed_positions(positions, branch)[None].astype(x.dtype)
    if key_mask is not None:
      # Padded positions start from zero in every stack, as in the reference; they never reach a
      # real token because their keys are masked.
      x = x * key_mask[..., None].astype(x.dtype)
    x = constrain(x, ("batch", "length", "embed"))

    if self.scan_layers and len(self.layers) > 1:
      x = self._scan(x, key_mask, branch)
    else:
      def run(layer: EncoderLayer, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        return layer(x, key_mask, branch)

      if self.remat:
        run = nnx.remat(run, policy=REMAT_POLICIES[self.remat_policy])
      for layer in self.layers:
        x = run(layer, x, key_mask)
    return self.layer_norm(x, branch)

  def _scan(self, x: jax.Array, key_mask: jax.Array | None, branch: str) -> jax.Array:
    """The layers as one `lax.scan`: XLA compiles one layer instead of `depth` copies.

    Parameters stay one module per layer (the checkpoint and PyTorch layout); they are stacked here,
    inside the step, along a new leading axis. The stack costs one extra copy of the stack's
    (sharded) parameters while the step runs; its gradient is the per-layer gradients.
    """
    parts = [nnx.split(layer) for layer in self.layers]
    graphdef = parts[0][0]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[state for _, state in parts])

    def body(x, state):
      return nnx.merge(graphdef, state)(x, key_mask, branch), None

    if self.remat:
      # prevent_cse is not needed inside scan and costs fusions.
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=False)
    x, _ = jax.lax.scan(body, x, stacked)
    return x
