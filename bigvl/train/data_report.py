"""What the training iterators served, over all processes: skip counts and the example-id digest.

Each process's iterator (`bigvl.data.stream.TrainIterator`) counts and digests its own rows and
keeps both in its checkpointed state; these helpers combine them for `metrics.jsonl`. Both are
collectives when there are several processes: every process must call them at the same step.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np


def _allgather(x: np.ndarray) -> np.ndarray:
  """(process_count, *x.shape): every process's `x`, in process order."""
  if jax.process_count() == 1:
    return x[None]
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x))


def stats(data_it: Any) -> dict[str, int]:
  """`data/served`, `data/skipped`, `data/skipped/<reason>`, … summed over processes."""
  if not hasattr(data_it, "stats"):
    return {}
  local = data_it.stats()
  names = sorted(local)
  summed = _allgather(np.array([local[k] for k in names], np.int64)).sum(axis=0)
  out = dict(zip(names, (int(v) for v in summed)))
  out["data/skipped_shards"] = local.get("data/skipped_shards", 0)  # every process sees all files
  return out


def ids_sha256(data_it: Any) -> str | None:
  """Digest of the example ids served, in order: one process's own digest, or with several the
  sha256 of all processes' digests in process order. None when the iterator keeps no digest."""
  digest = getattr(data_it, "ids_sha256", None)
  if digest is None or jax.process_count() == 1:
    return digest
  mine = np.frombuffer(bytes.fromhex(digest) or bytes(32), np.uint8)
  return hashlib.sha256(_allgather(mine).tobytes()).hexdigest()
