"""Rotary position embedding (RoFormer): q and k rotated by angles proportional to their positions.

Each pair of channels (i, i + head_dim/2) is rotated by position * base^(-2i/head_dim) (the
"rotate half" pairing of Llama and Hugging Face checkpoints). A rotation preserves norms, and the
product of a rotated q and k depends on their positions only through the difference, which is what
makes decoding with a cache and relative offsets agree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rotary(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """x: (B, L, heads, head_dim); positions: (B, L) or (L,) integers → x rotated, same dtype.

  Angles and products are float32: a bfloat16 angle at position 4000 is off by more than a radian.
  """
  d = x.shape[-1]
  if d % 2:
    raise ValueError(f"rotary positions need an even head_dim, not {d}")
  inv_freq = base ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)          # (d/2,)
  angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq           # (B?, L, d/2)
  angles = jnp.broadcast_to(angles, (*x.shape[:2], d // 2))[:, :, None, :]      # heads axis
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
