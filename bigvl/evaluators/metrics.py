"""Pure NumPy metrics for zero-shot classification and retrieval.

Ties are counted against the model: a positive at the same score as a negative is ranked below it.
A collapsed model (all similarities equal) therefore scores chance-or-worse, never a perfect recall.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Fraction of rows whose label is among the k highest scores (ties pessimistic)."""
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels)
  pos = logits[np.arange(len(labels)), labels]
  # Rank of the label = number of other classes scoring >= it.
  rank = (logits >= pos[:, None]).sum(axis=1) - 1
  return float(np.mean(rank < k))


def retrieval_recalls(sim: np.ndarray, text_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)
                      ) -> dict[str, float]:
  """Recall@K both ways for an (n_images, n_texts) similarity matrix.

  Args:
    sim: similarity of every image to every text.
    text_image: for each text, the index of its image (an image may have several texts; texts with
      identical strings are still separate items, each with its own image).
  Returns:
    {"i2t/r1": …, "t2i/r1": …, …, "mr": mean of all recalls}. Image→text is a hit when any of the
    image's texts is in the top K; text→image when its image is.
  """
  sim = np.asarray(sim, np.float64)
  text_image = np.asarray(text_image)
  n_img, n_txt = sim.shape
  if text_image.shape != (n_txt,):
    raise ValueError(f"text_image has shape {text_image.shape}, expected ({n_txt},)")
  positive = text_image[None, :] == np.arange(n_img)[:, None]          # (n_img, n_txt)
  if not positive.any(axis=1).all():
    raise ValueError("every image needs at least one text")
  # i2t: best positive score per image; rank = number of negatives scoring >= it.
  best_pos = np.where(positive, sim, -np.inf).max(axis=1)
  i2t_rank = (np.where(positive, -np.inf, sim) >= best_pos[:, None]).sum(axis=1)
  # t2i: for each text, the number of other images scoring >= its image.
  own = sim[text_image, np.arange(n_txt)]
  t2i_rank = (sim >= own[None, :]).sum(axis=0) - 1
  out = {}
  for k in ks:
    out[f"i2t/r{k}"] = float(np.mean(i2t_rank < k))
  for k in ks:
    out[f"t2i/r{k}"] = float(np.mean(t2i_rank < k))
  out["mr"] = float(np.mean([out[f"{d}/r{k}"] for d in ("i2t", "t2i") for k in ks]))
  return out


def retrieval_chance(n_images: int, text_image: np.ndarray, k: int = 1) -> dict[str, float]:
  """Expected Recall@k of a random ranking (for reporting beside the measured numbers)."""
  text_image = np.asarray(text_image)
  n_txt = len(text_image)
  per_image = np.bincount(text_image, minlength=n_images)
  # i2t: P(at least one of the m positives among k random picks out of n_txt).
  from math import comb
  i2t = float(np.mean([1 - comb(n_txt - m, k) / comb(n_txt, k) for m in per_image]))
  return {f"i2t/r{k}": i2t, f"t2i/r{k}": min(k, n_images) / n_images}
