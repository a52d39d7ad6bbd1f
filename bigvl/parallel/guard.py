"""A guard against under-sharding: large parameters must not be replicated along `fsdp`.

A rules table that forgets a logical name (or maps it to None) silently replicates that parameter,
and its optimizer state, on every device of the fsdp axis; on a pod the first sign is an
out-of-memory error after a long compile. The guard fails before anything is compiled and names the
parameters and their logical axes.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding


class UnderShardedError(ValueError):
  """Large parameters are replicated along the fsdp axis; the message lists them."""


def _axes(spec_entry) -> tuple[str, ...]:
  if spec_entry is None:
    return ()
  return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def replicated_along(abstract: Any, shardings: Any, axis: str, min_bytes: int
                     ) -> list[tuple[str, tuple[int, ...], int]]:
  """(path, shape, bytes) of every leaf of at least `min_bytes` whose sharding does not use
  mesh `axis`, largest first."""
  out = []
  flat = jax.tree_util.tree_leaves_with_path(abstract)
  for (path, leaf), sharding in zip(flat, jax.tree.leaves(
      shardings, is_leaf=lambda x: isinstance(x, NamedSharding))):
    nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    if nbytes < min_bytes:
      continue
    if not any(axis in _axes(e) for e in sharding.spec):
      out.append((jax.tree_util.keystr(path), tuple(leaf.shape), nbytes))
  return sorted(out, key=lambda r: -r[2])


def check_fsdp(abstract: Any, shardings: Any, *, min_bytes: int, axis: str = "fsdp") -> None:
  """Raises UnderShardedError when `axis` has more than one device and a parameter of at least
  `min_bytes` is replicated along it. `min_bytes` 0 turns the guard off.

  abstract: the parameters' shapes (anything with .shape and .dtype); shardings: the matching
  NamedShardings.
  """
  if min_bytes <= 0:
    return
  meshes = {s.mesh for s in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))}
  if not any(dict(m.shape).get(axis, 1) > 1 for m in meshes):
    return
  bad = replicated_along(abstract, shardings, axis, min_bytes)
  if not bad:
    return
  lines = [f"  {path} {shape} {nbytes / 2**20:.1f} MiB" for path, shape, nbytes in bad[:10]]
  more = f"\n  … and {len(bad) - 10} more" if len(bad) > 10 else ""
  total = sum(b for _, _, b in bad)
  raise UnderShardedError(
      f"{len(bad)} parameter(s) of at least {min_bytes:,} bytes ({total / 2**30:.2f} GiB in all) "
      f"are replicated along mesh axis {axis!r}, which has more than one device:\n"
      + "\n".join(lines) + more +
      f"\nMap one of their logical axes to {axis!r} in sharding_rules (the default maps 'embed'), "
      f"or raise sharding_guard_min_bytes (0: no check).")
