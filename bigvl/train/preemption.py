"""Stopping cleanly when asked: SIGTERM (a preemption notice) or SIGINT (Ctrl-C).

The first signal only raises a flag; the loop finishes the step it is in, saves a checkpoint with the
data iterator's position and returns, so the process exits 0 and the same command resumes. A second
signal stops at once (KeyboardInterrupt); a save in flight is atomic, so that loses nothing either.

On many processes all must stop at the same step, or the survivors hang in the next collective:
- with `jax.distributed` (which starts JAX's preemption service, owner of SIGTERM), SIGTERM reaches
  the loop through `multihost_utils.reached_preemption_sync_point`, which picks one step for all;
- any other signal is agreed on every `agree_every` steps by an all-gather of the per-process flags.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Callable

import jax
import numpy as np

log = logging.getLogger("bigvl")


def _jax_owns_sigterm() -> bool:
  from jax._src import distributed
  return (distributed.global_state.client is not None
          and distributed.global_state.preemption_sync_manager is not None)


def _any_process(flag: bool) -> bool:
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.array([flag], np.int32))))


class Preemption:
  """`with Preemption() as p: ... if p.should_stop(step): save and leave`."""

  def __init__(self, *, agree_every: int = 10, process_count: int | None = None,
               any_process: Callable[[bool], bool] = _any_process):
    self.agree_every = agree_every
    self.process_count = jax.process_count() if process_count is None else process_count
    self._any_process = any_process
    self._jax_sync = self.process_count > 1 and _jax_owns_sigterm()
    self.requested: str | None = None   # the signal's name, once one arrived here
    self._previous: dict[int, object] = {}

  def __enter__(self) -> "Preemption":
    signals = [signal.SIGINT]
    if not self._jax_sync:
      signals.append(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.requested:
      raise KeyboardInterrupt(f"second {name}: stopping without a checkpoint")
    self.requested = name
    log.warning("%s received: finishing this step, saving a checkpoint, then exiting "
                "(send it again to stop at once)", name)

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after `step`; the same answer on every process."""
    if self.process_count == 1:
      return self.requested is not None
    if self._jax_sync:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        self.requested = self.requested or "SIGTERM"
        return True
    if step % self.agree_every:
      return False
    return self._any_process(self.requested is not None)
