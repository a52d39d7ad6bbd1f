"""Optimizer: AdamW with linear warm-up then cosine decay, global-norm clipping."""

from __future__ import annotations

import jax
import ml_collections
import optax


def lr_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  o = config
  warmup = min(o.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=o.lr * o.min_lr_ratio)


def _decay_mask(params):
  # Weight decay only on matrices: biases, LayerNorm vectors and scalars such as logit_scale are
  # left alone (decaying logit_scale towards 0 would fight the temperature).
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the optimizer from `config.optim`; returns it and its learning-rate schedule."""
  o = config.optim
  schedule = lr_schedule(o, total_steps)
  parts = []
  if o.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                           mask=_decay_mask))
  return optax.chain(*parts), schedule
