"""Masked image modelling targets and loss: patches of the picture, normalised per patch (MAE's
`norm_pix_loss`), and the mean squared error over the masked patches of each example."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """(B, H, W, C) → (B, (H/p)·(W/p), p·p·C), patches row-major as the patch embedding orders them."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def normalize_patches(patches: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Each patch to zero mean and unit variance over its pixels and channels together: the hue of a
  flat patch survives (its channels differ), its brightness offset does not."""
  patches = patches.astype(jnp.float32)
  mean = patches.mean(-1, keepdims=True)
  var = patches.var(-1, keepdims=True)
  return (patches - mean) * jax.lax.rsqrt(var + eps)


def masked_patch_l2(pred: jax.Array, target: jax.Array, masked: jax.Array) -> jax.Array:
  """pred, target (B, N, D); masked (B, M) indices of the masked patches → (B,) the mean over
  those patches of each patch's mean squared error."""
  pick = lambda x: jnp.take_along_axis(x, masked[..., None].astype(jnp.int32), axis=1)
  err = jnp.square(pick(pred).astype(jnp.float32) - pick(target).astype(jnp.float32))
  return err.mean(axis=(1, 2))
