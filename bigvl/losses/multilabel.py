"""Multi-label losses over independent per-label logits: binary cross-entropy and the asymmetric
loss (Ridnik et al., ASL), which down-weights the many easy negatives of a large label set.

Both take logits (B, C) and targets (B, C) in {0, 1}, with an optional `weight` (B, C) (0 drops an
entry: padding, a "difficult" label), and return the mean over examples of the per-example sum
over labels (ASL's convention; BCE's mean over labels is that divided by C).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _reduce(per_entry: jax.Array, weight: jax.Array | None) -> jax.Array:
  if weight is not None:
    per_entry = per_entry * weight
  return per_entry.sum(axis=-1).mean()


def binary_cross_entropy(logits: jax.Array, targets: jax.Array,
                         weight: jax.Array | None = None) -> jax.Array:
  """Σ_labels BCE(sigmoid(logit), target), averaged over examples (computed from log-sigmoids)."""
  logits = logits.astype(jnp.float32)
  t = targets.astype(jnp.float32)
  per = -(t * jax.nn.log_sigmoid(logits) + (1 - t) * jax.nn.log_sigmoid(-logits))
  return _reduce(per, weight)


def asymmetric_loss(logits: jax.Array, targets: jax.Array, weight: jax.Array | None = None, *,
                    gamma_pos: float = 0.0, gamma_neg: float = 4.0,
                    clip: float = 0.05) -> jax.Array:
  """ASL: positives -(1-p)^γ+ log p; negatives -p_m^γ- log(1-p_m), with the shifted probability
  p_m = max(p - clip, 0) (easy negatives below `clip` cost nothing). The focusing weights are
  constants of the gradient, as in the paper's reference formulation."""
  logits = logits.astype(jnp.float32)
  t = targets.astype(jnp.float32)
  p = jax.nn.sigmoid(logits)
  log_p = jax.nn.log_sigmoid(logits)
  p_m = jnp.maximum(p - clip, 0.0) if clip > 0 else p
  log_not_pm = jnp.log(jnp.clip(1.0 - p_m, 1e-8, 1.0))
  w_pos = jax.lax.stop_gradient((1 - p) ** gamma_pos) if gamma_pos else 1.0
  w_neg = jax.lax.stop_gradient(p_m ** gamma_neg) if gamma_neg else 1.0
  per = -(t * w_pos * log_p + (1 - t) * w_neg * log_not_pm)
  return _reduce(per, weight)


LOSSES = {"bce": binary_cross_entropy, "asl": asymmetric_loss}
