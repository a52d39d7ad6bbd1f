"""Grounding one query in a live stream: `StreamingGrounder(params, query, ...).push(frames)` gives
each new frame's (start, end, inside) probabilities as it arrives, never reading a later frame,
holding only the last `long + short` frames.

  g = StreamingGrounder.from_run("workdirs/tsgsv_tiny", "the red circle moves left")
  for chunk in camera:                      # (n, D) frame features
    scores = g.push(chunk)                  # (n, 3)

Scores equal the grounding evaluator's (the same `stride`):
  stride = short   frame t sits at place t − st of the window [st, st + S), st = S·⌊t / S⌋,
                   with the `long` frames before st as its memory; frames after t are not there
                   yet (masked), which changes nothing: the decoder is causal
  stride = 1       frame t is the last of the window ending at t
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _bucket(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


class StreamingGrounder:
  def __init__(self, params: Any, query: str | tuple[np.ndarray, np.ndarray], *,
               graphdef: nnx.GraphDef, tokenizer=None, long: int, short: int,
               stride: int | None = None):
    if isinstance(query, str):
      if tokenizer is None:
        raise ValueError("a query given as text needs the tokenizer")
      query = tokenizer.encode(query)
    self.ids, self.mask = (np.asarray(x, np.int32) for x in query)
    self.params, self.long, self.short = params, long, short
    self.stride = stride or short
    if self.stride not in (1, short):
      raise ValueError(f"stride={stride}: 1 or the short window ({short})")
    self.size = long + short
    self.buf: np.ndarray | None = None       # the last `size` frames, the newest last
    self.t = -1                              # index of the newest frame

    def run(p, feats, mask, ids, tmask):
      logits = nnx.merge(graphdef, p)(feats, mask, ids, tmask)["logits"]
      return jax.nn.sigmoid(logits)
    self._run = jax.jit(run)

  @classmethod
  def from_run(cls, workdir: str, query: str, *, stride: int | None = None,
               step: int | None = None) -> "StreamingGrounder":
    """The grounder of a TSGSV run's checkpoint (its config, tokenizer and weights)."""
    from bigvl.parallel import mesh as mesh_lib
    from bigvl.train import evaluate
    loaded = evaluate.load(evaluate.run_config(workdir), workdir, step=step)
    system = loaded.system
    graphdef, _, _ = mesh_lib.model_shapes(system.make_model, loaded.mesh, system.rules)
    m = system.config.model
    return cls(loaded.params, query, graphdef=graphdef, tokenizer=system.tokenizer,
               long=m.long, short=m.short, stride=stride)

  def reset(self) -> None:
    self.buf, self.t = None, -1

  def _window(self, t: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Frame t's window (from the buffer, whose newest frame is t), its mask, t's place."""
    n, d = self.size, self.buf.shape[1]
    frame_of = t - (n - 1) + np.arange(n)            # the buffer's frame indices
    if self.stride == 1:
      return self.buf, (frame_of >= 0).astype(np.int32), self.short - 1
    st = (t // self.short) * self.short
    lo = st - self.long
    block = np.zeros((n, d), np.float32)
    keep = (frame_of >= max(lo, 0))
    block[frame_of[keep] - lo] = self.buf[keep]
    mask = np.zeros((n,), np.int32)
    mask[frame_of[keep] - lo] = 1
    return block, mask, t - st

  def push(self, frames: np.ndarray) -> np.ndarray:
    """frames (n, D) → (n, 3) probabilities of start / end / inside, one row per frame."""
    frames = np.asarray(frames, np.float32)
    if frames.ndim == 1:
      frames = frames[None]
    if self.buf is None:
      self.buf = np.zeros((self.size, frames.shape[1]), np.float32)
    if frames.shape[1] != self.buf.shape[1]:
      raise ValueError(f"frames are {frames.shape[1]}-d, the stream's {self.buf.shape[1]}-d")
    blocks, masks, places = [], [], []
    for f in frames:
      self.buf = np.concatenate([self.buf[1:], f[None]])
      self.t += 1
      b, m, p = self._window(self.t)
      blocks.append(b)
      masks.append(m)
      places.append(p)
    n = len(blocks)
    if n == 0:
      return np.zeros((0, 3), np.float32)
    pad = _bucket(n) - n
    feats = np.stack(blocks + [blocks[-1]] * pad)
    mask = np.stack(masks + [masks[-1]] * pad)
    ids = np.repeat(self.ids[None], n + pad, 0)
    tmask = np.repeat(self.mask[None], n + pad, 0)
    scores = np.asarray(self._run(self.params, jnp.asarray(feats), jnp.asarray(mask),
                                  jnp.asarray(ids), jnp.asarray(tmask)))
    return scores[np.arange(n), np.asarray(places)]
