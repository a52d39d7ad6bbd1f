"""The pre-LN transformer block: x + attn(norm(x)), then (decoders) x + cross_attn(norm(x),
context), then x + ffn(norm(x)).

Attribute names are torchscale's / fairseq's (`self_attn`, `self_attn_layer_norm`, `encoder_attn`,
`encoder_attn_layer_norm`, `ffn`, `final_layer_norm`), the keys of released BEiT-3 checkpoints.
Sub-modules come from factories, so a Multiway block is this block with factories that build one
copy per branch; route arguments after x (the branch) are passed to every sub-module.
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from bigvl.models.layers.init import NormFactory
from bigvl.parallel.sharding import constrain


class Block(nnx.Module):
  """Self-attention → optional cross-attention → MLP, each pre-normed and residual.

  attention(mode) makes the attention layers ("causal" or "bidirectional" for `self_attn`, "cross"
  for `encoder_attn`); mlp() makes `ffn`; norm(width) the pre-norms.
  """

  def __init__(self, width: int, *, attention: Callable[[str], nnx.Module],
               mlp: Callable[[], nnx.Module], norm: NormFactory, causal: bool = False,
               cross: bool = False):
    # Construction order fixes which random numbers each weight draws: keep it.
    self.self_attn = attention("causal" if causal else "bidirectional")
    self.self_attn_layer_norm = norm(width)
    if cross:
      self.encoder_attn = attention("cross")
      self.encoder_attn_layer_norm = norm(width)
    else:
      self.encoder_attn = self.encoder_attn_layer_norm = None
    self.ffn = mlp()
    self.final_layer_norm = norm(width)

  def __call__(self, x: jax.Array, *route, key_mask: jax.Array | None = None,
               context: jax.Array | None = None, context_mask: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    """x: (B, L, width); key_mask: (B, L) padding of x; context, context_mask: what
    `encoder_attn` attends to (decoders)."""
    x = x + self.self_attn(self.self_attn_layer_norm(x, *route), *route, key_mask=key_mask,
                           positions=positions)
    if self.encoder_attn is not None:
      x = x + self.encoder_attn(self.encoder_attn_layer_norm(x, *route), *route,
                                key_mask=context_mask, context=context)
    elif context is not None:
      raise ValueError("this block has no cross-attention: build it with cross=True")
    x = x + self.ffn(self.final_layer_norm(x, *route), *route)
    return constrain(x, ("batch", "length", "embed"))
