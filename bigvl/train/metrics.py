"""Where results go: JSON lines a program can read, TensorBoard events, and a console progress line.

Only process 0 writes; other processes get a writer that drops everything, so call sites need no
`if jax.process_index() == 0`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Mapping

import numpy as np

log = logging.getLogger("bigvl")


def _to_py(v: Any) -> Any:
  if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "__array__"):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()
  return v


class MetricWriter:
  """Appends `{"step": s, name: value, ...}` lines to `workdir/metrics.jsonl`, mirrors scalars to TB."""

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        # tensorboardX writes event files with protobuf alone: no TensorFlow on the training path.
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: _to_py(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """Steps/s and ETA over a sliding window of recent steps (compile time excluded after the first)."""

  def __init__(self, first_step: int, total_steps: int):
    self.total = total_steps
    self._marks: list[tuple[int, float]] = [(first_step, time.time())]

  def update(self, step: int) -> dict[str, float]:
    now = time.time()
    self._marks.append((step, now))
    self._marks = self._marks[-20:]
    (s0, t0), (s1, t1) = self._marks[0], self._marks[-1]
    rate = (s1 - s0) / max(t1 - t0, 1e-9) if s1 > s0 else 0.0
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    return {"steps_per_s": rate, "eta_s": eta}

  @staticmethod
  def line(step: int, total: int, metrics: Mapping[str, Any]) -> str:
    eta = metrics.get("eta_s", float("nan"))
    eta_s = "?" if not math.isfinite(eta) else time.strftime("%H:%M:%S", time.gmtime(eta))
    return (f"step {step}/{total}  loss {float(metrics.get('train/loss', float('nan'))):.4f}  "
            f"{metrics.get('steps_per_s', 0.0):.2f} steps/s  eta {eta_s}")
