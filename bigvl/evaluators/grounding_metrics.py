"""Temporal grounding metrics (numpy): proposals from start × end scores, NMS, R@k at IoU m, and
calibrated AP of the per-frame inside score.

Proposals (TSGSV's): the per-frame start and end probabilities of one (video, query); a sequence
longer than `max_points` is median-filtered (width 3) and sampled at max(max_points, T // 4)
evenly spaced frames; every pair i ≤ j is a candidate [t_i, t_j] scored p_start(i) · p_end(j)
(the dense grid: TSGSV's sparse 2D-TAN grid is a subset of it), times t = index / (n − 1) ·
duration; greedy NMS drops a candidate whose IoU with a kept one is > `nms`, until `top` are kept.
R@k IoU=m: the share of queries with a proposal of IoU > m among their first k (fewer than k
proposals: the last is repeated, which changes nothing).
cAP (De Geest et al., online action detection): frames sorted by score; w = negatives /
positives; calibrated precision at rank r = TP_r / (TP_r + FP_r / w); cAP = its mean over the
positive frames. A query with no positive or no negative frame scores 1 (as the authors' code).
mcAP = the mean cAP over queries.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def iou(segments: np.ndarray, gt: Sequence[float]) -> np.ndarray:
  """IoU of segments (N, 2) with one segment (2,); a zero-length union gives 0."""
  seg = np.asarray(segments, np.float64).reshape(-1, 2)
  inter = np.clip(np.minimum(seg[:, 1], gt[1]) - np.maximum(seg[:, 0], gt[0]), 0, None)
  union = np.maximum(seg[:, 1], gt[1]) - np.minimum(seg[:, 0], gt[0])
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _median3(x: np.ndarray) -> np.ndarray:
  padded = np.concatenate([x[:1], x, x[-1:]])
  return np.median(np.stack([padded[:-2], padded[1:-1], padded[2:]]), axis=0)


def proposals(start: np.ndarray, end: np.ndarray, duration: float, *, top: int = 5,
              nms: float = 0.5, max_points: int = 128) -> tuple[np.ndarray, np.ndarray]:
  """Per-frame start / end probabilities (T,) → (proposals (K, 2) in seconds, scores (K,)),
  K ≤ top, best first."""
  start, end = np.asarray(start, np.float64), np.asarray(end, np.float64)
  t = len(start)
  if t == 0 or len(end) != t:
    raise ValueError(f"start and end scores must be equal non-empty sequences, got {t}, {len(end)}")
  if t > max_points:
    n = max(max_points, t // 4)
    idx = np.round(np.linspace(0, t - 1, n)).astype(np.int64)
    start, end = _median3(start)[idx], _median3(end)[idx]
  n = len(start)
  i, j = np.triu_indices(n)
  score = start[i] * end[j]
  scale = duration / max(n - 1, 1)
  cand = np.stack([i * scale, j * scale], axis=1)
  order = np.argsort(-score, kind="stable")
  cand, score = cand[order], score[order]
  alive = np.ones(len(cand), bool)
  kept: list[int] = []
  while len(kept) < top and alive.any():
    k = int(np.argmax(alive))
    kept.append(k)
    alive[k] = False
    alive &= ~(iou(cand, cand[k]) > nms)
  return cand[kept], score[kept]


def recall(props: Sequence[np.ndarray], gts: Sequence[Sequence[float]],
           ks: Sequence[int] = (1, 5), ious: Sequence[float] = (0.3, 0.5, 0.7)
           ) -> dict[str, float]:
  """{"r{k}_iou{m}": share of queries hit} over queries (proposals (K, 2), gt (2,))."""
  out = {}
  overlaps = [iou(p, g) if len(p) else np.zeros((0,)) for p, g in zip(props, gts)]
  for k in ks:
    for m in ious:
      hits = [bool(len(o) and (o[:k] > m).any()) for o in overlaps]
      out[f"r{k}_iou{m}"] = float(np.mean(hits)) if hits else 0.0
  return out


def calibrated_ap(scores: np.ndarray, labels: np.ndarray) -> float:
  """cAP of per-frame scores (T,) against binary labels (T,); see the module docstring."""
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels, bool)
  pos, neg = int(labels.sum()), int((~labels).sum())
  if pos == 0 or neg == 0:
    return 1.0
  w = neg / pos
  order = np.argsort(-scores, kind="stable")
  hit = labels[order]
  tp = np.cumsum(hit)
  fp = np.cumsum(~hit)
  cprec = tp / (tp + fp / w)
  return float(np.sum(cprec * hit) / pos)


def moment_mask(gt: Sequence[float], duration: float, num_frames: int,
                extension: float = 0.0) -> np.ndarray:
  """Frames (num_frames,) inside the moment gt (seconds), widened by `extension` × its length
  on each side (the authors' evaluation uses 1.0)."""
  scale = (num_frames - 1) / duration
  s, e = gt[0] * scale, gt[1] * scale
  span = e - s
  lo, hi = max(int(s - extension * span), 0), min(int(e + extension * span), num_frames - 1)
  mask = np.zeros(num_frames, bool)
  mask[lo:hi + 1] = True
  return mask
