"""Margin ranking: a positive score should beat its negative by a margin (PyTorch's
`MarginRankingLoss` with target 1 and mean reduction), TPM-CL's loss on partial samples."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def margin_ranking(pos: jax.Array, neg: jax.Array, margin: float = 0.6) -> jax.Array:
  """mean(max(0, margin − (pos − neg))) over matching entries of `pos` and `neg`."""
  diff = pos.astype(jnp.float32) - neg.astype(jnp.float32)
  return jnp.mean(jax.nn.relu(margin - diff))
