"""Parameter-efficient additions to a frozen model: a bottleneck adapter and LoRA.

Both start as the identity of what they wrap (their last projection is zero), so a pretrained model
computes exactly what it did until training moves them. Their weights are `nnx.LoRAParam` (a kind
of `nnx.Param`): a system that trains only them uses `trainable = nnx.LoRAParam`, and the frozen
base weights get no optimizer state.

Dropout takes its randomness at call time (`rng`: a key or an `nnx.Rngs`); without one it is off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bigvl.models.layers.init import Initializer, Names
from bigvl.models.layers.mlp import ACTIVATIONS


def dropout(x: jax.Array, rate: float, rng: jax.Array | nnx.Rngs | None) -> jax.Array:
  """Inverted dropout: zeros a `rate` fraction and rescales the rest; identity without an rng."""
  if rng is None or rate == 0.0:
    return x
  key = rng.dropout() if isinstance(rng, nnx.Rngs) else rng
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _lora_param(init: Initializer, key, shape, names: Names, param_dtype) -> nnx.LoRAParam:
  return nnx.LoRAParam(init(key, shape, param_dtype), out_sharding=names, eager_sharding=False)


class BottleneckAdapter(nnx.Module):
  """x + up(drop(act(down(x)))) (Houlsby et al.; no activation by default): width → bottleneck →
  width, `up` zero so it starts as the identity."""

  def __init__(self, width: int, bottleneck: int, *, rngs: nnx.Rngs, dropout_rate: float = 0.0,
               activation: str | None = None, dtype=jnp.float32, param_dtype=jnp.float32,
               init: Initializer = nnx.initializers.lecun_normal()):
    if activation is not None and activation not in ACTIVATIONS:
      raise ValueError(f"activation={activation!r}: use None or one of {sorted(ACTIVATIONS)}")
    self.dropout_rate = dropout_rate
    self.activation = activation
    self.dtype = dtype
    self.down = _lora_param(init, rngs.params(), (width, bottleneck), ("embed", None), param_dtype)
    self.up = _lora_param(nnx.initializers.zeros, rngs.params(), (bottleneck, width),
                          (None, "embed"), param_dtype)

  def __call__(self, x: jax.Array, *, rng: jax.Array | nnx.Rngs | None = None) -> jax.Array:
    h = x.astype(self.dtype) @ self.down[...].astype(self.dtype)
    if self.activation is not None:
      h = ACTIVATIONS[self.activation](h)
    h = dropout(h, self.dropout_rate, rng)
    return x + (h @ self.up[...].astype(self.dtype)).astype(x.dtype)


class LoRA(nnx.Module):
  """base(x) + (alpha / rank) · B(A(drop(x))) (Hu et al.), around any linear `base`.

  `base` keeps its own parameters (frozen by the system's `trainable` filter); `lora_a` is random,
  `lora_b` zero. Route arguments after x go to `base` (a Multiway linear, say); the low-rank update
  is shared. names: the logical axes of base's (in, out), for A's input and B's output.
  """

  def __init__(self, base: nnx.Module, d_in: int, d_out: int, *, rank: int, rngs: nnx.Rngs,
               alpha: float | None = None, dropout_rate: float = 0.0,
               names: Names = ("embed", "mlp"), dtype=jnp.float32, param_dtype=jnp.float32,
               init: Initializer = nnx.initializers.lecun_normal()):
    self.base = base
    self.scale = (rank if alpha is None else alpha) / rank
    self.dropout_rate = dropout_rate
    self.dtype = dtype
    self.lora_a = _lora_param(init, rngs.params(), (d_in, rank), (names[0], None), param_dtype)
    self.lora_b = _lora_param(nnx.initializers.zeros, rngs.params(), (rank, d_out),
                              (None, names[1]), param_dtype)

  def __call__(self, x: jax.Array, *route, rng: jax.Array | nnx.Rngs | None = None) -> jax.Array:
    y = self.base(x, *route)
    h = dropout(x, self.dropout_rate, rng).astype(self.dtype)
    update = (h @ self.lora_a[...].astype(self.dtype)) @ self.lora_b[...].astype(self.dtype)
    return y + (self.scale * update).astype(y.dtype)
