"""Temporal grounding targets and losses (TSGSV, arXiv 2308.07102): Gaussian soft labels of a
moment's start, end and inside, and the focal binary cross-entropy on them.

Frames are indexed 0 … T−1; a moment [start, end] in seconds of a video of `duration` seconds
sits at frame positions s = start / duration · (T − 1) and e = end / duration · (T − 1) (floats),
L = e − s. For frame t:
  start(t)  = exp(−(t − s)² / 2σ_b²)          σ_b = 0.25 · L
  end(t)    = exp(−(t − e)² / 2σ_b²)
  inside(t) = exp(−(t − (s + e)/2)² / 2σ_i²)   σ_i = 0.21 · L
(no clipping to the span; L is floored at a small positive value so a zero-length moment gives a
narrow peak, not a division by zero).

Focal BCE on logits z against soft labels y, per frame and channel:
  ℓ = |σ(z) − y|^γ · BCE(z, y)        the focal factor is not differentiated (γ = 3)
  loss = Σ_c w_c · mean over valid frames of ℓ_c,   w = (0.5, 0.5, 1.0) for (start, end, inside)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CHANNELS = ("start", "end", "inside")
CHANNEL_WEIGHTS = (0.5, 0.5, 1.0)
SIGMA_BOUNDARY, SIGMA_INSIDE = 0.25, 0.21


def moment_frames(start: float, end: float, duration: float, num_frames: int
                  ) -> tuple[float, float]:
  """A moment in seconds → its (start, end) frame positions (floats, clipped to the video)."""
  if duration <= 0:
    raise ValueError(f"duration {duration} must be > 0")
  scale = (num_frames - 1) / duration
  s = float(np.clip(start * scale, 0, num_frames - 1))
  e = float(np.clip(end * scale, 0, num_frames - 1))
  return min(s, e), max(s, e)


def gaussian_labels(s: np.ndarray | float, e: np.ndarray | float, positions: np.ndarray
                    ) -> np.ndarray:
  """Soft labels (..., P, 3) at frame `positions` (P,) of moments at frame positions s, e (...)."""
  s = np.asarray(s, np.float64)[..., None]
  e = np.asarray(e, np.float64)[..., None]
  t = np.asarray(positions, np.float64)
  span = np.maximum(e - s, 1e-3)
  sb, si = SIGMA_BOUNDARY * span, SIGMA_INSIDE * span
  out = np.stack([np.exp(-(t - s) ** 2 / (2 * sb ** 2)), np.exp(-(t - e) ** 2 / (2 * sb ** 2)),
                  np.exp(-(t - 0.5 * (s + e)) ** 2 / (2 * si ** 2))], axis=-1)
  return out.astype(np.float32)


def focal_bce(logits: jax.Array, labels: jax.Array, valid: jax.Array, *, gamma: float = 3.0,
              weights=CHANNEL_WEIGHTS) -> tuple[jax.Array, jax.Array]:
  """logits, labels (..., 3), valid (...) bool → (loss, per-channel means (3,)); see the module
  docstring. Labels may be soft (a teacher's σ, detached by the caller)."""
  z = logits.astype(jnp.float32)
  y = labels.astype(jnp.float32)
  bce = jnp.maximum(z, 0) - z * y + jnp.log1p(jnp.exp(-jnp.abs(z)))
  factor = jax.lax.stop_gradient(jnp.abs(jax.nn.sigmoid(z) - y) ** gamma)
  m = valid.astype(jnp.float32)[..., None]
  axes = tuple(range(z.ndim - 1))
  per_channel = jnp.sum(factor * bce * m, axis=axes) / jnp.maximum(jnp.sum(m, axis=axes), 1.0)
  return jnp.sum(per_channel * jnp.asarray(weights, jnp.float32)), per_channel
