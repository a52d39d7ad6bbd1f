"""Logical axis names → mesh axes, and sharding constraints on activations.

Every parameter carries logical axis names (e.g. ("embed", "mlp")). One rules table per config maps
them to mesh axes. `constrain` is how modules annotate key activations: inside `use_rules(mesh, rules)`
it becomes a `with_sharding_constraint`; outside (eager tests, plain CPU) it is the identity.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

LogicalNames = Sequence[str | None]
Rules = Sequence[tuple[str, str | Sequence[str] | None]]

_ctx = threading.local()


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules):
  """Within this context, `constrain` shards activations on `mesh` by `rules`."""
  prev = getattr(_ctx, "value", None)
  _ctx.value = (mesh, tuple(rules))
  try:
    yield
  finally:
    _ctx.value = prev


def logical_to_spec(names: LogicalNames, rules: Rules) -> P:
  """PartitionSpec for logical `names`: first matching rule wins; a mesh axis is used at most once."""
  table: dict[str, list] = {}
  for name, axes in rules:
    table.setdefault(name, []).append(axes)
  used: set[str] = set()
  out = []
  for name in names:
    chosen = None
    for axes in table.get(name, []) if name is not None else []:
      axes_t = (axes,) if isinstance(axes, str) else tuple(axes or ())
      if axes_t and not used.intersection(axes_t):
        chosen = axes_t[0] if len(axes_t) == 1 else axes_t
        used.update(axes_t)
        break
    out.append(chosen)
  return P(*out)


def constrain(x: jax.Array, names: LogicalNames) -> jax.Array:
  ctx = getattr(_ctx, "value", None)
  if ctx is None:
    return x
  mesh, rules = ctx
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))
