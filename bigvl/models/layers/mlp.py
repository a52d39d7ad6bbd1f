"""The transformer feed-forward block: fc1 → activation → optional Sub-LN → fc2.

Gated (SwiGLU, Llama): fc2(act(fc1 x) * fc3 x), Meta's w1/w3/w2 naming (Hugging Face's gate_proj,
up_proj, down_proj). Sub-LN (Magneto) normalises the hidden activations before fc2 (`ffn_layernorm`,
torchscale's name). Route arguments after x pick the weights of a Multiway linear (none for plain
use).
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from bigvl.models.layers.init import LinearFactory, NormFactory
from bigvl.parallel.sharding import constrain

ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),   # exact (erf), as BEiT-3
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


class MLP(nnx.Module):
  """width → hidden → width. init_gain scales the initial fc1, fc3 and fc2 weights (Magneto)."""

  def __init__(self, width: int, hidden: int, *, linear: LinearFactory,
               norm: NormFactory | None = None, activation: str = "gelu", gated: bool = False,
               sub_ln: bool = False, use_bias: bool = True, init_gain: float = 1.0):
    if activation not in ACTIVATIONS:
      raise ValueError(f"activation={activation!r}: use one of {sorted(ACTIVATIONS)}")
    if sub_ln and norm is None:
      raise ValueError("sub_ln needs a norm factory")
    self.activation = activation
    self.fc1 = linear(width, hidden, ("embed", "mlp"), gain=init_gain, use_bias=use_bias)
    self.fc2 = linear(hidden, width, ("mlp", "embed"), gain=init_gain, use_bias=use_bias)
    self.fc3 = (linear(width, hidden, ("embed", "mlp"), gain=init_gain, use_bias=use_bias)
                if gated else None)
    self.ffn_layernorm = norm(hidden) if sub_ln else None

  def __call__(self, x: jax.Array, *route) -> jax.Array:
    h = ACTIVATIONS[self.activation](self.fc1(x, *route))
    if self.fc3 is not None:
      h = h * self.fc3(x, *route)
    h = constrain(h, ("batch", "length", "mlp"))
    if self.ffn_layernorm is not None:
      h = self.ffn_layernorm(h, *route)
    return self.fc2(h, *route)
