"""Vision Transformer pieces: the patch embedding and a small pre-LN ViT built from shared blocks.

Images are NHWC. The patch embedding is a Conv with kernel = stride = patch (`proj`; PyTorch's
Conv2d weight (out, in, kh, kw) is `kernel.transpose(3, 2, 0, 1)`), flattened row-major over the
patch grid as PyTorch's `flatten(2)`, with an optional learned CLS token (1, 1, width) in front.

The patch embedding takes images either normalised (float, [-1, 1]) or as uint8 pixels, which it
normalises itself in float32 (`normalize_pixels`): the input pipeline ships uint8 to the devices, a
quarter of float32's bytes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigvl.models.layers.attention import Attention
from bigvl.models.layers.block import Block
from bigvl.models.layers.factories import Linears
from bigvl.models.layers.init import Initializer, param, partitioned, trunc_normal
from bigvl.models.layers.mlp import MLP
from bigvl.models.layers.stack import run_layers
from bigvl.parallel.sharding import constrain


# The reference transform's float32 value of each uint8 level: (v / 255 - 0.5) / 0.5, rounded at
# each step as numpy (and PyTorch) do it. Looked up, not computed: XLA turns a division by a
# constant into a multiplication by its reciprocal, which is one ulp off for 205 of the 256 levels.
_LEVELS = ((np.arange(256, dtype=np.float32) / np.float32(255.0) - np.float32(0.5))
           / np.float32(0.5))


def normalize_pixels(images: jax.Array) -> jax.Array:
  """uint8 pixels -> float32 in [-1, 1], bit-identical to `bigvl.data.image_ops.normalize` on the
  host; float images pass through unchanged."""
  if images.dtype != jnp.uint8:
    return images
  return jnp.asarray(_LEVELS)[images.astype(jnp.int32)]


class PatchEmbedding(nnx.Module):
  """(B, H, W, C) → (B, [1 +] (H/p)·(W/p), width): non-overlapping patches, CLS token first."""

  def __init__(self, width: int, patch_size: int, image_size: int, *, rngs: nnx.Rngs,
               in_channels: int = 3, cls_token: bool = True,
               init: Initializer | None = None, dtype=jnp.float32, param_dtype=jnp.float32):
    init = trunc_normal(0.02) if init is None else init
    if image_size % patch_size:
      raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    p = patch_size
    self.image_size = image_size
    self.patch_size = patch_size
    self.dtype = dtype
    self.proj = nnx.Conv(
        in_channels, width, kernel_size=(p, p), strides=(p, p), padding="VALID",
        dtype=dtype, param_dtype=param_dtype,
        kernel_init=partitioned(init, ("patch", "patch", "channels", "embed")),
        bias_init=partitioned(nnx.initializers.zeros, ("embed",)),
        rngs=rngs)
    # Drawn after the conv: that order fixes the initial values of released-model ports.
    self.cls_token = (param(init(rngs.params(), (1, 1, width), param_dtype), (None, None, "embed"))
                      if cls_token else None)

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  def __call__(self, images: jax.Array) -> jax.Array:
    b, h, w, _ = images.shape
    if (h, w) != (self.image_size, self.image_size):
      raise ValueError(f"images are {h}x{w}, the model expects {self.image_size}x{self.image_size}")
    x = self.proj(normalize_pixels(images).astype(self.dtype))
    x = x.reshape(b, -1, x.shape[-1])
    if self.cls_token is None:
      return x
    cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, x.shape[-1]))
    return jnp.concatenate([cls, x], axis=1)


class ViT(nnx.Module):
  """Patch embedding + learned positions + pre-LN blocks + final norm.

  Returns (cls, patches): (B, width) and (B, num_patches, width), both after the final norm.
  """

  def __init__(self, *, width: int, depth: int, heads: int, mlp_dim: int, patch_size: int,
               image_size: int, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               init_std: float = 0.02, attention: str = "xla", remat: bool = False,
               remat_policy: str = "full", scan_layers: bool = False):
    make = Linears(rngs, dtype=dtype, param_dtype=param_dtype,
                   kernel_init=lambda gain: trunc_normal(init_std, gain))
    self.remat, self.remat_policy, self.scan_layers = remat, remat_policy, scan_layers
    self.patch_embed = PatchEmbedding(width, patch_size, image_size, rngs=rngs,
                                      init=trunc_normal(init_std), dtype=dtype,
                                      param_dtype=param_dtype)
    self.pos_embed = param(
        trunc_normal(init_std)(rngs.params(), (1, self.patch_embed.num_patches + 1, width),
                               param_dtype), (None, "position", "embed"))
    self.blocks = nnx.List([
        Block(width, norm=make.norm,
              attention=lambda mode: Attention(width, num_heads=heads, mode=mode,
                                               linear=make.linear, impl=attention),
              mlp=lambda: MLP(width, mlp_dim, linear=make.linear))
        for _ in range(depth)])
    self.norm = make.norm(width)

  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = self.patch_embed(images)
    x = constrain(x + self.pos_embed[...].astype(x.dtype), ("batch", "length", "embed"))
    x = run_layers(self.blocks, x, lambda block, x: block(x), remat=self.remat,
                   remat_policy=self.remat_policy, scan=self.scan_layers)
    x = self.norm(x)
    return x[:, 0], x[:, 1:]
