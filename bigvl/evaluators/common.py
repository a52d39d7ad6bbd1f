"""What an evaluator is given: functions that embed images and texts with the current parameters."""

from __future__ import annotations

from typing import Callable, Mapping, Protocol

import numpy as np


class Encoder(Protocol):
  def images(self, images: np.ndarray) -> np.ndarray: ...
  def texts(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray: ...


class Evaluator(Protocol):
  every: int

  def run(self, encoder: Encoder) -> Mapping[str, float]: ...


def batched(fn: Callable[..., np.ndarray], batch_size: int) -> Callable[..., np.ndarray]:
  """Applies `fn` over leading-axis chunks of fixed size (the last one padded) and concatenates.

  A fixed chunk size keeps one compiled program for every call.
  """
  def run(*arrays: np.ndarray) -> np.ndarray:
    n = len(arrays[0])
    outs = []
    for start in range(0, n, batch_size):
      chunk = [a[start:start + batch_size] for a in arrays]
      m = len(chunk[0])
      if m < batch_size:
        chunk = [np.concatenate([c, np.repeat(c[-1:], batch_size - m, axis=0)]) for c in chunk]
      outs.append(np.asarray(fn(*chunk))[:m])
    return np.concatenate(outs) if outs else np.zeros((0,))
  return run


def class_embeddings(encoder: Encoder, tokenizer, classnames: list[str], templates: list[str]
                     ) -> np.ndarray:
  """Per class: mean of the L2-normalised embeddings of every prompt, renormalised. (C, d)."""
  texts = [t.format(c) for c in classnames for t in templates]
  ids, mask = tokenizer.encode_batch(texts)
  z = encoder.texts(ids, mask).reshape(len(classnames), len(templates), -1)
  z = z / np.linalg.norm(z, axis=-1, keepdims=True)
  z = z.mean(axis=1)
  return z / np.linalg.norm(z, axis=-1, keepdims=True)
