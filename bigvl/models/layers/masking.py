"""Choosing patches to mask: the top-scoring ones (attentive masking) or random ones.

Scores rank the patches of each picture (higher = more relevant to its text); `split_by_score`
returns the indices of the `num_masked` best ("effective") patches and of the rest. Random masking
is the same split with uniform noise as the scores. The choice is never differentiated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def split_by_score(scores: jax.Array, num_masked: int) -> tuple[jax.Array, jax.Array]:
  """scores (B, N) → (masked (B, num_masked), visible (B, N - num_masked)) patch indices, the
  masked ones best first, the visible ones in raster order."""
  order = jnp.argsort(-jax.lax.stop_gradient(scores).astype(jnp.float32), axis=-1)
  masked = order[:, :num_masked].astype(jnp.int32)
  visible = jnp.sort(order[:, num_masked:], axis=-1).astype(jnp.int32)
  return masked, visible


def index_mask(indices: jax.Array, n: int) -> jax.Array:
  """(B, M) indices → (B, n) bool, True at the indices."""
  return jnp.zeros((indices.shape[0], n), bool).at[jnp.arange(indices.shape[0])[:, None],
                                                   indices].set(True)


def num_masked(num_patches: int, ratio: float) -> int:
  """Patches masked at `ratio`: at least one, and at least one left visible."""
  return int(min(num_patches - 1, max(1, round(ratio * num_patches))))
