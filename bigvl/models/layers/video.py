"""The video tower: any image tower applied to every frame, then temporal mixing across frames.

Frames are NHWC images stacked as (B, T, H, W, 3) with a (B, T) mask of real frames (a clip
shorter than T is padded). The image tower sees the B·T frames as one batch, so frames are sharded
with their clip's batch row: nothing crosses devices. Temporal mixing:
  "mean"         none: the frame features as they are (a single-frame model, the ablation's
                 baseline); the clip embedding is their mean over real frames.
  "transformer"  CLIP4Clip's seqTransf: frame features + learned frame positions through a small
                 bidirectional transformer (padding frames masked), added back to the frame
                 features (a residual, so it starts as "mean"), then the masked mean.
Returns frame tokens (B, T, d) and the clip embedding (B, d), both un-normalised float32.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from bigvl.models.layers.attention import Attention
from bigvl.models.layers.block import Block
from bigvl.models.layers.factories import Linears
from bigvl.models.layers.init import param, trunc_normal
from bigvl.models.layers.mlp import MLP
from bigvl.models.layers.stack import run_layers
from bigvl.parallel.sharding import constrain

TEMPORAL = ("mean", "transformer")

# images (N, H, W, 3) → features (N, d)
FrameEncoder = Callable[[jax.Array], jax.Array]


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of x (B, T, d) over the positions where mask (B, T) is 1; a row without any is 0."""
  m = mask.astype(jnp.float32)[..., None]
  return jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


class TemporalTransformer(nnx.Module):
  """seqTransf: frame positions + `depth` pre-LN blocks, residual over the input features."""

  def __init__(self, width: int, num_frames: int, *, depth: int, heads: int, mlp_dim: int,
               rngs: nnx.Rngs, init_std: float = 0.02, attention: str = "xla",
               dtype=jnp.float32, param_dtype=jnp.float32):
    make = Linears(rngs, dtype=dtype, param_dtype=param_dtype,
                   kernel_init=lambda gain: trunc_normal(init_std, gain))
    self.frame_pos = param(trunc_normal(init_std)(rngs.params(), (num_frames, width), param_dtype),
                           ("position", "embed"))

    def attn(mode: str) -> Attention:
      return Attention(width, num_heads=heads, mode=mode, linear=make.linear, impl=attention)

    self.blocks = nnx.List([
        Block(width, attention=attn, mlp=lambda: MLP(width, mlp_dim, linear=make.linear),
              norm=make.norm) for _ in range(depth)])
    self.norm = make.norm(width)
    self.num_frames, self.dtype = num_frames, dtype

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    t = x.shape[1]
    if t > self.num_frames:
      raise ValueError(f"{t} frames > the {self.num_frames} frame positions of the tower")
    h = (x + self.frame_pos[...][None, :t].astype(x.dtype)).astype(self.dtype)
    key_mask = mask.astype(bool)
    h = run_layers(self.blocks, h, lambda block, h, m: block(h, key_mask=m), key_mask)
    return x + self.norm(h).astype(x.dtype)


class VideoTower(nnx.Module):
  """frames (B, T, H, W, 3) uint8 or [-1, 1], frame_mask (B, T) → (frame tokens (B, T, d),
  clip embedding (B, d)), float32.

  `frame_encoder` is called on the (B·T, H, W, 3) frames; it is not owned here (a model keeps its
  image tower as its own attribute, e.g. `towers`, and passes a bound method), so that parameter
  paths stay those of the image tower's checkpoints.
  """

  def __init__(self, width: int, num_frames: int, *, temporal: str = "transformer",
               depth: int = 4, heads: int = 4, mlp_dim: int | None = None,
               rngs: nnx.Rngs, init_std: float = 0.02, attention: str = "xla",
               dtype=jnp.float32, param_dtype=jnp.float32):
    if temporal not in TEMPORAL:
      raise ValueError(f"temporal={temporal!r}: use one of {list(TEMPORAL)}")
    self.temporal = temporal
    self.mixer = (TemporalTransformer(width, num_frames, depth=depth, heads=heads,
                                      mlp_dim=mlp_dim or 4 * width, rngs=rngs, init_std=init_std,
                                      attention=attention, dtype=dtype, param_dtype=param_dtype)
                  if temporal == "transformer" else None)

  def __call__(self, frame_encoder: FrameEncoder, frames: jax.Array, frame_mask: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    b, t = frames.shape[:2]
    flat = frames.reshape((b * t,) + frames.shape[2:])
    return self.mix(frame_encoder(flat).reshape(b, t, -1), frame_mask)

  def mix(self, x: jax.Array, frame_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Frame features already computed (B, T, d) → (frame tokens, clip embedding), as
    `__call__` (a model that also reads the frame tower's patch tokens calls the tower itself)."""
    x = constrain(x.astype(jnp.float32), ("batch", "length", "embed"))
    if self.mixer is not None:
      x = self.mixer(x, frame_mask)
    return x, masked_mean(x, frame_mask)
