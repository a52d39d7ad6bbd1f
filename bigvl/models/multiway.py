"""Multiway (BEiT-3 / Magneto) transformer stacks: one set of weights per modality branch.

A Multiway module holds one copy of a sub-module per branch ("A" = vision, "B" = text) and the
caller picks the branch by name. M²-Encoder never mixes the modalities in one sequence, so unlike
the PyTorch reference there is no split position: a whole batch runs through one branch.

The layers are the shared ones (`bigvl.models.layers`): a Multiway layer is `layers.block.Block`
whose linear and norm factories build `Multiway(A=..., B=...)` holders, and the branch name is the
"route" argument the shared modules pass to them. Magneto's choices are options of those layers:
Sub-LN in attention (`inner_attn_ln`) and in the MLP (`ffn_layernorm`), exact GELU, and the init
gain `subln_gain(depth)`.

Attribute names follow the released PyTorch keys (`self_attn.q_proj.A`, `ffn.B.fc1`, ...) so that
the checkpoint name map is nearly the identity. The parameter leaves keep NNX's names and layouts:
Linear `kernel` is PyTorch `weight.T` (in, out); LayerNorm `scale` is PyTorch `weight`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bigvl.models.layers.attention import Attention
from bigvl.models.layers.block import Block
from bigvl.models.layers.factories import Linears
from bigvl.models.layers.init import trunc_normal
from bigvl.models.layers.mlp import MLP
from bigvl.models.layers.stack import run_layers
from bigvl.parallel.sharding import constrain

BRANCHES = ("A", "B")


class MultiwayConfig(Protocol):
  """What a Multiway stack reads from its model's config (M²-Encoder's `M2Config` is one)."""
  width: int
  heads: int
  mlp_dim: int
  ln_eps: float
  init_std: float
  dtype: Any
  param_dtype: Any
  remat: bool
  remat_policy: str
  scan_layers: bool
  attention: str


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


def branched(factory: Callable[..., nnx.Module],
             branches: Sequence[str]) -> Callable[..., Multiway]:
  """A factory of one module → a factory of Multiway holders (one module per branch, in order)."""
  return lambda *args, **kwargs: multiway(lambda: factory(*args, **kwargs), branches)


def subln_gain(num_layers: int) -> float:
  """Magneto's Sub-LN init gain sqrt(log 2N) for fc1, fc2, out_proj and v_proj of an N-layer stack.

  Each stack uses its own depth: the reference builds `backbone_vl` after setting encoder_layers to
  the top depth, so N = depth for the bottom stack and N = vl_depth for the top stack.
  """
  return math.sqrt(math.log(2 * num_layers))


def plain_factories(cfg: MultiwayConfig, rngs: nnx.Rngs) -> Linears:
  return Linears(rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                 kernel_init=lambda gain: trunc_normal(cfg.init_std, gain), norm_eps=cfg.ln_eps)


def encoder_layer(cfg: MultiwayConfig, branches: Sequence[str], gain: float,
                  rngs: nnx.Rngs) -> Block:
  """Pre-LN block with Sub-LN inside both residual branches (Magneto), weights per branch.

  The attention's projections and norms are each Multiway (`self_attn.q_proj.A`); the MLP is
  Multiway as a whole (`ffn.A.fc1`), as in the released checkpoints.
  """
  plain = plain_factories(cfg, rngs)
  linear, norm = branched(plain.linear, branches), branched(plain.norm, branches)
  return Block(
      cfg.width, norm=norm,
      attention=lambda mode: Attention(cfg.width, num_heads=cfg.heads, mode=mode, linear=linear,
                                       norm=norm, sub_ln=True, init_gain=gain,
                                       impl=cfg.attention),
      mlp=lambda: multiway(lambda: MLP(cfg.width, cfg.mlp_dim, linear=plain.linear,
                                       norm=plain.norm, sub_ln=True, init_gain=gain), branches))


class Encoder(nnx.Module):
  """A stack of Multiway layers and a final Multiway LayerNorm, optionally with learned positions.

  `embed_positions` (bottom stack only) holds one table per branch; position ids start at 2, the
  fairseq convention the reference keeps, so rows 0 and 1 are never read.
  """

  def __init__(self, cfg: MultiwayConfig, num_layers: int, branches: Sequence[str],
               rngs: nnx.Rngs, embed_positions: Multiway | None = None):
    gain = subln_gain(num_layers)
    self.remat = cfg.remat
    self.remat_policy = cfg.remat_policy
    self.scan_layers = cfg.scan_layers
    self.embed_positions = embed_positions
    self.layers = nnx.List([encoder_layer(cfg, branches, gain, rngs) for _ in range(num_layers)])
    self.layer_norm = branched(plain_factories(cfg, rngs).norm, branches)(cfg.width)

  def __call__(self, x: jax.Array, key_mask: jax.Array | None, branch: str, *,
               positions: jax.Array | None = None, cls_attention: bool = False,
               hidden: bool = False):
    """x: (B, L, width); key_mask: (B, L) bool, True on real tokens, or None (no padding).

    positions: (B, L) position ids of x's tokens (a subset of an image's patches, MAE-style);
    default 2, 3, .... cls_attention: also return the last layer's attention of the first token
    (CLS) over the others, averaged over heads, (B, L - 1) float32: `(x, attention)`. hidden: also
    return the stack's input (positions added) and every layer's output but the last (whose
    normalised output is the first result): `(x, [input, out_1, ..., out_{n-1}])`, the depths a
    fusion encoder may read (layer by layer, not scanned).
    """
    if self.embed_positions is not None:
      if positions is None:
        x = x + self.embed_positions(jnp.arange(2, x.shape[1] + 2), branch)[None].astype(x.dtype)
      else:
        x = x + self.embed_positions(positions, branch).astype(x.dtype)
    elif positions is not None:
      raise ValueError("positions are for the stack that holds the position tables")
    if key_mask is not None:
      # Padded positions start from zero in every stack, as in the reference; they never reach a
      # real token because their keys are masked.
      x = x * key_mask[..., None].astype(x.dtype)
    x = constrain(x, ("batch", "length", "embed"))

    def run(layer: Block, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
      return layer(x, branch, key_mask=key_mask)

    if hidden:
      states = [x]
      for layer in self.layers:
        x = run(layer, x, key_mask)
        states.append(x)
      return self.layer_norm(x, branch), states[:-1]
    layers = self.layers[:-1] if cls_attention else self.layers
    x = run_layers(layers, x, run, key_mask, remat=self.remat,
                   remat_policy=self.remat_policy, scan=self.scan_layers)
    if not cls_attention:
      return self.layer_norm(x, branch)
    last = self.layers[-1]
    h = last.self_attn_layer_norm(x, branch)
    weights = last.self_attn.weights(h, branch, queries=h[:, :1], key_mask=key_mask)
    x = run(last, x, key_mask)
    return self.layer_norm(x, branch), jnp.mean(weights[:, :, 0, 1:], axis=1)
