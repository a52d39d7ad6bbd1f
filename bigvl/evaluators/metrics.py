"""Pure NumPy metrics for zero-shot classification and retrieval.

Ties are counted against the model: a positive at the same score as a negative is ranked below it.
A collapsed model (all similarities equal) therefore scores chance-or-worse, never a perfect recall.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class NonfiniteScoresError(ValueError):
  """A similarity or logit matrix holds NaN or inf: a diverged or broken model, never a score."""


def check_finite(scores: np.ndarray, what: str) -> None:
  bad = ~np.isfinite(scores)
  if bad.any():
    r, c = np.argwhere(bad)[0]
    raise NonfiniteScoresError(
        f"the {what} matrix {scores.shape} holds {int(bad.sum())} NaN or inf values (first at "
        f"[{r}, {c}]: {scores[r, c]}): the model's embeddings are not finite, no score is given")


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Fraction of rows whose label is among the k highest scores (ties pessimistic)."""
  logits = np.asarray(logits, np.float64)
  check_finite(logits, "zero-shot logit")
  labels = np.asarray(labels)
  pos = logits[np.arange(len(labels)), labels]
  # Rank of the label = number of other classes scoring >= it.
  rank = (logits >= pos[:, None]).sum(axis=1) - 1
  return float(np.mean(rank < k))


def caption_owners(texts: Sequence[str], text_image: Sequence[int]) -> list[np.ndarray]:
  """For each text, every image one of whose captions is exactly this string.

  A caption that repeats (two photos both captioned "a dog running on grass") describes each of its
  images equally well, so retrieving any of them is a hit, as in the reference M²-Encoder evaluation
  (its ground truth maps each caption string to all images that have it). Identical strings embed
  identically, so counting only the caption's own image would make the copies tie with each other
  and cost every image involved a rank.
  """
  by_string: dict[str, set[int]] = {}
  for t, i in zip(texts, text_image):
    by_string.setdefault(t, set()).add(int(i))
  return [np.array(sorted(by_string[t]), dtype=np.int64) for t in texts]


def reference_positives(texts: Sequence[str], text_image: Sequence[int]
                        ) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """The positives of the reference M²-Encoder evaluation (its eval_retrieval.py `get_data`), for
  texts already prepared as it prepares them (`reference_text`).

  Returns (owners, image_texts): for each text, every image one of whose captions is this string
  (text→image: any copy of a repeated caption hits each of its images, as `caption_owners`); for
  each image, the LAST index of each of its caption strings (image→text: the reference marks one
  column per string, `text_ids[cap]` being overwritten by each later copy, so retrieving an
  earlier copy of the same string is a miss). The copies embed identically; ties counting against
  the model ranks the earlier copies above the marked one, as a stable sort of the scores would.
  """
  last: dict[str, int] = {}
  for j, t in enumerate(texts):
    last[t] = j
  n_img = int(max(text_image)) + 1 if len(text_image) else 0
  per_image: list[set[int]] = [set() for _ in range(n_img)]
  for t, i in zip(texts, text_image):
    per_image[int(i)].add(last[t])
  return (caption_owners(texts, text_image),
          [np.array(sorted(s), dtype=np.int64) for s in per_image])


def reference_text(text: str) -> str:
  """The reference retrieval script's caption preparation: lower-case, curly double quotes
  straightened (before captions are grouped into repeats)."""
  return text.lower().replace("\u201c", '"').replace("\u201d", '"')


def _pairs(text_image, n_txt: int) -> tuple[np.ndarray, np.ndarray]:
  """(image, text) index pairs of every positive, from one owner per text or a list per text."""
  if isinstance(text_image, np.ndarray) and text_image.ndim == 1 and text_image.dtype != object:
    if text_image.shape != (n_txt,):
      raise ValueError(f"text_image has shape {text_image.shape}, expected ({n_txt},)")
    return text_image.astype(np.int64), np.arange(n_txt)
  owners = [np.atleast_1d(np.asarray(o, np.int64)) for o in text_image]
  if len(owners) != n_txt:
    raise ValueError(f"text_image has {len(owners)} entries, expected {n_txt} (one per text)")
  if any(len(o) == 0 for o in owners):
    raise ValueError("every text needs at least one image in text_image")
  img = np.concatenate(owners)
  txt = np.repeat(np.arange(n_txt), [len(o) for o in owners])
  return img, txt


def retrieval_recalls(sim: np.ndarray, text_image, ks: Sequence[int] = (1, 5, 10),
                      chunk: int = 1024, image_texts=None) -> dict[str, float]:
  """Recall@K both ways for an (n_images, n_texts) similarity matrix.

  Args:
    sim: similarity of every image to every text.
    text_image: for each text, the index of its image, or a sequence of the indices of all images
      it describes (`caption_owners`: repeated captions). An image may have several texts.
    chunk: rows of `sim` compared at a time (bounds the temporary memory for COCO-sized sets).
    image_texts: for each image, the texts that are a hit for it in image→text (default: those
      whose `text_image` names it); `reference_positives` gives the reference's.
  Returns:
    {"i2t/r1": …, "t2i/r1": …, …, "mr": mean of all recalls}. Image→text is a hit when any of the
    image's texts is in the top K; text→image when any of its images is. Ties count against the
    model: a negative scoring the same as the best positive ranks above it.
  """
  sim = np.asarray(sim)
  if not np.issubdtype(sim.dtype, np.floating):
    sim = sim.astype(np.float64)
  check_finite(sim, "image-text similarity")
  n_img, n_txt = sim.shape
  if isinstance(text_image, (list, tuple)) and all(np.ndim(o) == 0 for o in text_image):
    text_image = np.asarray(text_image, np.int64)
  img, txt = _pairs(text_image, n_txt)
  if len(img) and (img.min() < 0 or img.max() >= n_img):
    raise ValueError(f"text_image names an image outside [0, {n_img})")
  if not np.isin(np.arange(n_img), img).all():
    raise ValueError("every image needs at least one text")
  if image_texts is None:
    img_i, txt_i = img, txt
  else:
    if len(image_texts) != n_img:
      raise ValueError(f"image_texts has {len(image_texts)} entries, expected {n_img}")
    per = [np.atleast_1d(np.asarray(o, np.int64)) for o in image_texts]
    if any(len(o) == 0 for o in per):
      raise ValueError("every image needs at least one text in image_texts")
    img_i = np.repeat(np.arange(n_img), [len(o) for o in per])
    txt_i = np.concatenate(per)
  score_i = sim[img_i, txt_i]
  best_i = np.full(n_img, -np.inf, sim.dtype)
  np.maximum.at(best_i, img_i, score_i)
  score = sim[img, txt]
  best_t = np.full(n_txt, -np.inf, sim.dtype)
  np.maximum.at(best_t, txt, score)
  # Rank of the best positive = items scoring >= it, less the positives doing so (itself and any
  # positive tied with it).
  at_or_above_i = np.zeros(n_img, np.int64)
  at_or_above_t = np.zeros(n_txt, np.int64)
  for lo in range(0, n_img, chunk):
    block = sim[lo:lo + chunk]
    at_or_above_i[lo:lo + chunk] = (block >= best_i[lo:lo + chunk, None]).sum(axis=1)
    at_or_above_t += (block >= best_t[None, :]).sum(axis=0)
  i2t_rank = at_or_above_i - np.bincount(img_i, weights=score_i >= best_i[img_i],
                                         minlength=n_img)
  t2i_rank = at_or_above_t - np.bincount(txt, weights=score >= best_t[txt], minlength=n_txt)
  out = {}
  for k in ks:
    out[f"i2t/r{k}"] = float(np.mean(i2t_rank < k))
  for k in ks:
    out[f"t2i/r{k}"] = float(np.mean(t2i_rank < k))
  out["mr"] = float(np.mean([out[f"{d}/r{k}"] for d in ("i2t", "t2i") for k in ks]))
  return out


def retrieval_chance(n_images: int, text_image, k: int = 1, image_texts=None) -> dict[str, float]:
  """Expected Recall@k of a random ranking (for reporting beside the measured numbers)."""
  from math import comb
  if isinstance(text_image, (list, tuple)) and all(np.ndim(o) == 0 for o in text_image):
    text_image = np.asarray(text_image, np.int64)
  n_txt = len(text_image)
  img, txt = _pairs(text_image, n_txt)
  per_image = (np.bincount(img, minlength=n_images) if image_texts is None
               else np.array([len(np.atleast_1d(o)) for o in image_texts]))
  per_text = np.bincount(txt, minlength=n_txt)
  # P(at least one of m positives among k random picks out of n).
  hit = lambda n, m: 1 - comb(n - m, k) / comb(n, k)  # noqa: E731
  return {f"i2t/r{k}": float(np.mean([hit(n_txt, int(m)) for m in per_image])),
          f"t2i/r{k}": float(np.mean([hit(n_images, int(m)) for m in per_text]))}
