"""Optimizer: AdamW with linear warm-up then cosine decay, global-norm clipping."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
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


def adamw(o: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW with `o` = `config.optim`: global-norm clipping, then decoupled weight decay on
  matrices only."""
  parts = []
  if o.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                           mask=_decay_mask))
  return optax.chain(*parts)


def path_str(path) -> str:
  """A pytree path as "a/b/0/kernel" (what parameter-group patterns match)."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def scale_by_group(multiplier: Callable[[str], float]) -> optax.GradientTransformation:
  """Scales each update by `multiplier(path)`: a learning-rate multiplier per parameter group.

  Placed after AdamW it scales the whole step, the decoupled weight decay included, exactly as a
  group learning rate of lr × multiplier would. Stateless.
  """
  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda path, u: u * jnp.asarray(multiplier(path_str(path)), u.dtype), updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW from `config.optim` and its learning-rate schedule over `total_steps`."""
  schedule = lr_schedule(config.optim, total_steps)
  return adamw(config.optim, schedule), schedule
