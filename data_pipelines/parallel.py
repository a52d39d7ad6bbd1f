"""An ordered map over worker processes that falls back to a serial loop, never hangs.

Shard builders call this from very different hosts: the launch CLI, a training
process that has already started JAX, `python - <<EOF`, a notebook. A plain
multiprocessing.Pool hangs forever when its workers die at start-up (as spawned
ones do when __main__ cannot be re-imported); ProcessPoolExecutor reports it
as BrokenProcessPool instead, and the remaining items then run here. Results
are identical either way, only slower.
"""

from __future__ import annotations

import collections
import itertools
import logging
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Libraries whose native threads make fork() unsafe once imported.
_THREADED_MODULES = ("jax", "tensorflow", "torch")


def default_num_workers() -> int:
  """Cores this process may use (respects taskset/cgroup pinning on Linux)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def _context() -> multiprocessing.context.BaseContext:
  # fork starts in milliseconds and needs no importable __main__, but a forked
  # child inherits other threads' locks in whatever state they were.
  if sys.platform.startswith("linux") and not any(m in sys.modules for m in _THREADED_MODULES):
    return multiprocessing.get_context("fork")
  return multiprocessing.get_context("spawn")


def _apply(fn: Callable[[T], R], chunk: list[T]) -> list[R]:
  return [fn(x) for x in chunk]


def _warn_broken(error: Exception) -> bool:
  logging.warning("Worker processes failed (%s); continuing in this process.", error)
  return True


def imap(fn: Callable[[T], R], items: Iterable[T], num_workers: int,
         chunk_size: int = 1) -> Iterator[R]:
  """Yields fn(x) for each item, in order, computed in up to num_workers processes.

  fn must be a module-level function (it is pickled). Exceptions raised by fn
  propagate; a broken pool does not.
  """
  if num_workers <= 1:
    yield from map(fn, items)
    return
  it = iter(items)
  chunks = iter(lambda: list(itertools.islice(it, chunk_size)), [])
  executor = ProcessPoolExecutor(num_workers, mp_context=_context())
  pending: collections.deque = collections.deque()
  broken = False
  try:
    while True:
      # A bounded window: results are consumed as fast as they arrive, and a
      # huge input is never materialised as futures all at once.
      while not broken and len(pending) < 2 * num_workers:
        chunk = next(chunks, None)
        if chunk is None:
          break
        try:
          future = executor.submit(_apply, fn, chunk)
        except BrokenProcessPool as e:
          broken = _warn_broken(e)
          future = None
        pending.append((chunk, future))
      if not pending:
        break
      chunk, future = pending.popleft()
      if not broken and future is not None:
        try:
          yield from future.result()
          continue
        except BrokenProcessPool as e:
          broken = _warn_broken(e)
      yield from _apply(fn, chunk)
      if not pending:
        for rest in chunks:
          yield from _apply(fn, rest)
  finally:
    executor.shutdown(wait=True, cancel_futures=True)
