"""Multi-label classification metrics: average precision, mAP, top-k CP/CR/CF1/OP/OR/OF1, and the
mAP of uninformative scores.

Targets use one convention throughout: 1 positive, 0 negative, -1 ignored (VOC's "difficult"); an
ignored entry takes no part in any count, as if that (image, class) pair were not in the set.
Scores may be any finite numbers (logits, probabilities); only their order matters.

Decisions:
  * AP is the non-interpolated one (not VOC2007's 11-point): the mean, over a class's positives,
    of the precision at each positive's rank. Equal scores are ranked by a stable descending sort,
    so among ties the earlier item (lower index) ranks first; a tie-aware AP would differ only
    where positives and negatives share a score.
  * `topk_f1` follows ML-GCN/ASL: CP averages precision over every class (a class never predicted
    has precision 0); CR averages recall over the classes with at least one positive (recall is
    undefined for the rest). Each F1 is 0 where its precision and recall are both 0.
"""

from __future__ import annotations

import math

import numpy as np


def _check(scores: np.ndarray, targets: np.ndarray, ndim: int) -> tuple[np.ndarray, np.ndarray]:
  """Validated float64 scores and int8 targets of the same shape with `ndim` dimensions."""
  scores = np.asarray(scores)
  targets = np.asarray(targets)
  if scores.ndim != ndim or scores.shape != targets.shape:
    raise ValueError(f"scores {scores.shape} and targets {targets.shape} must be equal shapes "
                     f"with {ndim} dimension(s)")
  if not (np.issubdtype(scores.dtype, np.number) and not np.iscomplexobj(scores)):
    raise ValueError(f"scores must be real numbers, got dtype {scores.dtype}")
  scores = scores.astype(np.float64)
  bad = int(np.size(scores) - np.count_nonzero(np.isfinite(scores)))
  if bad:
    raise ValueError(f"scores have {bad} non-finite value(s) (NaN or inf)")
  _check_targets(targets)
  return scores, targets.astype(np.int8)


def _check_targets(targets: np.ndarray) -> None:
  """Raises unless every target is 1, 0 or -1."""
  odd = ~np.isin(targets, (-1, 0, 1))
  if np.any(odd):
    raise ValueError(f"targets must be 1, 0 or -1; found {np.asarray(targets)[odd].flat[0]!r} "
                     f"({int(np.count_nonzero(odd))} such entries)")


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
  """Non-interpolated AP of one class: mean over positives of the precision at their rank.

  Args:
    scores: (N,) finite scores, higher = more likely positive.
    targets: (N,) 1 positive, 0 negative, -1 ignored (left out before ranking).
  Returns:
    AP in [0, 1]; NaN when there is no positive. Ties: stable descending sort (earlier index first).
  """
  scores, targets = _check(scores, targets, 1)
  keep = targets >= 0
  scores, targets = scores[keep], targets[keep]
  positives = int(np.count_nonzero(targets == 1))
  if positives == 0:
    return float("nan")
  order = np.argsort(-scores, kind="stable")
  hits = targets[order] == 1
  ranks = np.flatnonzero(hits) + 1                  # 1-based rank of each positive
  return float(np.mean(np.arange(1, positives + 1) / ranks))


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> dict:
  """AP of every class (column) of (N, C) scores and targets, and their mean.

  Returns:
    {"map": mean AP over classes with >= 1 positive (NaN if none), "per_class": (C,) float64 with
    NaN for classes without a positive, "classes_scored": the count of classes with a positive}.
  """
  scores, targets = _check(scores, targets, 2)
  per_class = np.array([average_precision(scores[:, c], targets[:, c])
                        for c in range(scores.shape[1])], dtype=np.float64)
  scored = ~np.isnan(per_class)
  n = int(np.count_nonzero(scored))
  return {"map": float(np.mean(per_class[scored])) if n else float("nan"),
          "per_class": per_class, "classes_scored": n}


def topk_f1(scores: np.ndarray, targets: np.ndarray, k: int = 3) -> dict:
  """Per-class and overall precision/recall/F1 when each image predicts its k top-scored labels.

  Every label competes for the top k (ties: the lower class index wins); counts then leave out
  ignored (-1) entries, whether predicted or not. With TP_c, P_c (predicted) and G_c (positives):
    CP = mean_c TP_c / P_c (0 where P_c = 0), CR = mean over classes with G_c > 0 of TP_c / G_c,
    OP = sum TP / sum P, OR = sum TP / sum G, CF1 = 2 CP CR / (CP + CR), OF1 likewise.

  Args:
    scores: (N, C) finite scores.
    targets: (N, C) in {1, 0, -1}.
    k: labels predicted per image, 1 <= k <= C.
  Returns:
    {"cp", "cr", "cf1", "op", "or", "of1"} as floats in [0, 1] (NaN recalls if nothing is positive).
  """
  scores, targets = _check(scores, targets, 2)
  n, c = scores.shape
  if not 1 <= k <= c:
    raise ValueError(f"k must be in [1, {c}] (the number of classes), got {k}")
  top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  predicted = np.zeros((n, c), dtype=bool)
  predicted[np.arange(n)[:, None], top] = True
  valid = targets >= 0
  positive = targets == 1
  tp = np.count_nonzero(predicted & positive, axis=0).astype(np.float64)
  pred = np.count_nonzero(predicted & valid, axis=0).astype(np.float64)
  gt = np.count_nonzero(positive, axis=0).astype(np.float64)
  cp = float(np.mean(np.divide(tp, pred, out=np.zeros(c), where=pred > 0)))
  cr = float(np.mean(tp[gt > 0] / gt[gt > 0])) if np.any(gt > 0) else float("nan")
  op = float(tp.sum() / pred.sum()) if pred.sum() > 0 else 0.0
  o_r = float(tp.sum() / gt.sum()) if gt.sum() > 0 else float("nan")
  return {"cp": cp, "cr": cr, "cf1": _f1(cp, cr), "op": op, "or": o_r, "of1": _f1(op, o_r)}


def _f1(precision: float, recall: float) -> float:
  """Harmonic mean; 0 when both are 0, NaN when either is NaN."""
  if math.isnan(precision) or math.isnan(recall):
    return float("nan")
  total = precision + recall
  return 2 * precision * recall / total if total > 0 else 0.0


def chance_ap(n: int, p: int) -> float:
  """Exact expected AP of a uniformly random ranking of n items of which p are positive.

  With X_r = 1 if rank r holds a positive, AP = (1/p) sum_r X_r (1/r) sum_{s<=r} X_s, and
  E[X_r] = p/n, E[X_r X_s] = p(p-1)/(n(n-1)) for s != r; summing, with H_n = sum_{r<=n} 1/r,
    E[AP] = H_n / n + (p - 1)(n - H_n) / (n (n - 1))     (n > 1; 1 when n = 1).
  So p = 1 gives E[1/rank] = H_n / n and p = n gives 1. NaN when p = 0.
  """
  if not 0 <= p <= n:
    raise ValueError(f"need 0 <= positives <= items, got p={p}, n={n}")
  if p == 0:
    return float("nan")
  if n == 1:
    return 1.0
  h = math.fsum(1.0 / r for r in range(1, n + 1))
  return h / n + (p - 1) * (n - h) / (n * (n - 1))


def chance_map(targets: np.ndarray) -> float:
  """Expected mAP of scores that carry no information: the mean of `chance_ap` over classes.

  Args:
    targets: (N, C) or (N,) in {1, 0, -1}; per class, n counts the non-ignored items and p the
      positives, and classes without a positive are left out (as `mean_average_precision` does).
  Returns:
    The exact expectation of mAP under a uniformly random ranking per class; NaN if no positive.
  """
  targets = np.asarray(targets)
  if targets.ndim == 1:
    targets = targets[:, None]
  if targets.ndim != 2:
    raise ValueError(f"targets must be (N,) or (N, C), got shape {targets.shape}")
  _check_targets(targets)
  n = np.count_nonzero(targets >= 0, axis=0)
  p = np.count_nonzero(targets == 1, axis=0)
  cache: dict[tuple[int, int], float] = {}
  for key in zip(n.tolist(), p.tolist()):
    if key[1] > 0 and key not in cache:
      cache[key] = chance_ap(*key)
  values = [cache[key] for key in zip(n.tolist(), p.tolist()) if key[1] > 0]
  return float(np.mean(values)) if values else float("nan")
