"""LayerNorm and RMSNorm whose statistics are always float32, whatever the compute dtype.

A bfloat16 mean or variance over thousands of channels loses the small differences the norm exists
to rescale; the input is upcast, normalised, and the result cast to `dtype`. Sub-LN (Magneto) is not
a kind of norm: it is where a block places one (`inner_attn_ln`, `ffn_layernorm`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bigvl.models.layers.init import param


class LayerNorm(nnx.Module):
  """(x - mean) / sqrt(var + eps) * scale + bias; `scale` is PyTorch's `weight`."""

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


class RMSNorm(nnx.Module):
  """x / sqrt(mean(x²) + eps) * scale (Llama): no centring, no bias."""

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
    self.eps = eps
    self.dtype = dtype
    self.scale = param(jnp.ones((dim,), param_dtype), ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)
