"""Referring-expression comprehension as a choice among candidate boxes: the system scores every
candidate box of the picture against the expression ("refer") and the best-scored one is chosen.

Boxes travel as x0, y0, x1, y1 fractions of the picture's width and height (clipped to [0, 1]), so
they do not depend on the size the picture is read at; IoUs are computed on them.

Metrics (prefix = the entry's name): `{prefix}/acc_iou0.5` (the chosen box's IoU with the referred
one is at least 0.5), `{prefix}/{lang}/acc_iou0.5` per language (world), `{prefix}/mean_iou` and
`{prefix}/chance` (the accuracy of a uniform random choice among the candidates: per expression the
fraction of its candidates with IoU >= 0.5 with the referred box, averaged).

Sources: the scene world ("world": each evaluation scene of two or more objects, its target's
expression in each language, every object a candidate; pixel boxes over scenes.json's
params.image_size) and RefCOCO / RefCOCO+ / RefCOCOg ("refcoco:REFS", refs JSON or the public
pickle, with `instances` its instances.json and `data_dir` the image root; split default "val";
every annotation of the image a candidate, boxes over the image file's own size, read from its
header).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np

from bigvl.evaluators import common

log = logging.getLogger("bigvl")
SOURCES = ("world", "refcoco")
LANGS = ("en", "zh")
THRESHOLD = 0.5


def _langs(entry: Mapping[str, Any]) -> list[str]:
  return [s for s in str(entry.get("langs", "en,zh")).split(",") if s]


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU of boxes x0, y0, x1, y1 (last axis), broadcasting over the others; 0 where both are
  empty."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
  h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
  area = lambda x: np.clip(x[..., 2] - x[..., 0], 0, None) * np.clip(x[..., 3] - x[..., 1], 0, None)
  inter = w * h
  union = area(a) + area(b) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def header_size(path: str) -> tuple[int, int]:
  """(width, height) of the image at `path`, from its header (nothing decoded)."""
  from PIL import Image
  with Image.open(path) as img:
    return img.size


def keep_boxes(candidates: np.ndarray, target: int, max_boxes: int) -> tuple[np.ndarray, int]:
  """At most `max_boxes` candidates: the target and the first others, in their order; the
  target's new index."""
  if len(candidates) <= max_boxes:
    return candidates, target
  keep = np.sort(np.r_[target, [i for i in range(len(candidates)) if i != target][:max_boxes - 1]])
  return candidates[keep], int(np.flatnonzero(keep == target)[0])


class ReferringEvaluator:
  """Scores the argmax box of "refer" against the referred box."""

  requires = ("refer",)

  @classmethod
  def config_keys(cls) -> dict[str, Any]:
    return dict(instances="",   # RefCOCO instances.json of a refcoco: source
                langs="en,zh",  # the world's expression languages
                max_boxes=0)    # candidate boxes per expression, padded (0: the most of any)

  @classmethod
  def validate_config(cls, name: str, entry: Mapping[str, Any]) -> None:
    from bigvl.evaluators import kinds
    bad = [s for s in _langs(entry) if s not in LANGS]
    if bad or not _langs(entry):
      raise ValueError(f"evals.{name}.langs={entry.get('langs')!r}: use some of {list(LANGS)}")
    if entry.get("max_boxes", 0) < 0:
      raise ValueError(f"evals.{name}.max_boxes={entry.get('max_boxes')}: must be >= 0")
    where_kind, _ = kinds.parse_source(entry.get("source", "world"))
    if where_kind not in SOURCES:
      raise ValueError(f"evals.{name}.source={entry.get('source')!r}: referring reads 'world' "
                       "or 'refcoco:REFS'")
    if where_kind == "refcoco" and not entry.get("instances", ""):
      raise ValueError(f"evals.{name}.instances: a refcoco: source needs its instances.json")
    if where_kind == "world" and entry.get("instances", ""):
      raise ValueError(f"evals.{name}.instances={entry.get('instances')!r}: only for a refcoco: "
                       "source")

  @classmethod
  def from_config(cls, name: str, entry: Mapping[str, Any], *, tokenizer, image_size: int,
                  world_dir: str = "") -> "ReferringEvaluator":
    from bigvl.evaluators import kinds, public_formats, sources
    cls.validate_config(name, entry)
    where_kind, where = kinds.parse_source(entry.get("source", "world"))
    limit = entry.get("max_examples", 0)
    common_args = dict(tokenizer=tokenizer, prefix=name, every=entry.get("every", 0),
                       batch_size=entry.get("batch_size"), max_boxes=entry.get("max_boxes", 0))
    if where_kind == "world":
      if not world_dir:
        raise ValueError(f"evals.{name}: source 'world' needs the scene world")
      size = sources.scenes_meta(world_dir).get("params", {}).get("image_size")
      if not size:
        raise ValueError(f"evals.{name}: {world_dir}/{sources.SCENES_META} has no "
                         "params.image_size (rebuild the scene world)")
      data, metas = sources.scenes(world_dir, sources.split_or(entry, "eval"), image_size,
                                   limit)
      image_index, texts, candidates, targets, langs = [], [], [], [], []
      for i, m in enumerate(metas):
        if len(m["objects"]) < 2:
          continue
        boxes = np.array([o["box"] for o in m["objects"]], np.float64) / size
        for lang in _langs(entry):
          image_index.append(i)
          texts.append(m["refer"][lang])
          candidates.append(boxes)
          targets.append(m["target"])
          langs.append(lang)
      if not texts:
        raise ValueError(f"evals.{name}: no scene of the split has two or more objects")
      return cls(images=data.images, image_index=np.array(image_index), texts=texts,
                 candidates=candidates, targets=targets, langs=langs, **common_args)
    try:
      rows = public_formats.refcoco(where, entry["instances"],
                                    sources.split_or(entry, "val"),
                                    image_root=entry.get("data_dir", ""))
    except ValueError as e:
      raise type(e)(f"evals.{name}: {e}") from None
    if not rows:
      raise ValueError(f"evals.{name}: {where} has no referring expressions")
    if limit:
      rows = rows[:limit]
    paths = list(dict.fromkeys(r["image"] for r in rows))
    images = sources.image_files(paths, image_size, f"evals.{name} ({where})")
    sizes = {p: np.tile(np.array(header_size(p), np.float64), 2) for p in paths}
    column = {p: i for i, p in enumerate(paths)}
    return cls(images=images, image_index=np.array([column[r["image"]] for r in rows]),
               texts=[r["sentence"] for r in rows],
               candidates=[r["candidates"] / sizes[r["image"]] for r in rows],
               targets=[r["target"] for r in rows], **common_args)

  def __init__(self, *, images: common.Rows, image_index: np.ndarray, texts: Sequence[str],
               candidates: Sequence[np.ndarray], targets: Sequence[int], tokenizer,
               langs: Sequence[str] | None = None, prefix: str = "referring", every: int = 0,
               batch_size: int | None = None, max_boxes: int = 0):
    n = len(texts)
    self.image_index = np.asarray(image_index, np.int64)
    for what, got in (("image_index", self.image_index), ("candidates", candidates),
                      ("targets", targets), ("langs", langs)):
      if got is not None and len(got) != n:
        raise ValueError(f"{prefix}: {len(got)} {what} for {n} expressions")
    if not n:
      raise ValueError(f"{prefix}: no expressions")
    if self.image_index.min() < 0 or self.image_index.max() >= len(images):
      raise ValueError(f"{prefix}: image_index outside the {len(images)} images")
    k = max_boxes or max(len(c) for c in candidates)
    self.boxes = np.zeros((n, k, 4), np.float32)
    self.box_valid = np.zeros((n, k), np.int32)
    self.truth = np.zeros((n, 4), np.float32)   # as the boxes the system sees
    trimmed = 0
    for i, (c, t) in enumerate(zip(candidates, targets)):
      c = np.clip(np.asarray(c, np.float64).reshape(-1, 4), 0.0, 1.0)
      if not 0 <= t < len(c):
        raise ValueError(f"{prefix}: expression {i} ({texts[i]!r:.60}) has target {t} among "
                         f"{len(c)} candidates")
      self.truth[i] = c[t]
      trimmed += len(c) > k
      c, t = keep_boxes(c, int(t), k)
      self.boxes[i, :len(c)], self.box_valid[i, :len(c)] = c, 1
    if trimmed:
      log.info("%s: %d of %d expressions had more than max_boxes=%d candidates (kept the "
               "referred box and the first others)", prefix, trimmed, n, k)
    self.images, self.texts = images, list(texts)
    self.langs = list(langs) if langs is not None else None
    hits = (iou(self.boxes, self.truth[:, None]) >= THRESHOLD) & (self.box_valid > 0)
    self.chance = hits.sum(-1) / self.box_valid.sum(-1)
    self.text, self.text_mask = common.as_written(tokenizer).encode_batch(self.texts)
    self.prefix, self.every, self.batch_size = prefix, every, batch_size

  def rows(self) -> common.Rows:
    """One row per expression: its picture (decoded once per batch), tokens and candidates."""
    def load(idx: np.ndarray) -> dict[str, np.ndarray]:
      pics, inverse = np.unique(self.image_index[idx], return_inverse=True)
      return {"image": self.images.load(pics)["image"][inverse.reshape(-1)],
              "text": self.text[idx], "text_mask": self.text_mask[idx],
              "boxes": self.boxes[idx], "box_valid": self.box_valid[idx]}
    return common.Rows(len(self.texts), load)

  def choose(self, predictor: common.Predictor) -> np.ndarray:
    """(n,) the index of each expression's best-scored valid candidate."""
    scores = np.asarray(predictor.run("refer", self.rows(), self.batch_size)["scores"],
                        np.float64)
    if scores.shape != self.box_valid.shape:
      raise ValueError(f"{self.prefix}: refer gives scores {scores.shape} for candidate boxes "
                       f"{self.box_valid.shape}")
    return np.where(self.box_valid > 0, scores, -np.inf).argmax(-1)

  def run(self, predictor: common.Predictor) -> dict[str, float]:
    p = self.prefix
    chosen = self.choose(predictor)
    overlap = iou(self.boxes[np.arange(len(chosen)), chosen], self.truth)
    hit = overlap >= THRESHOLD
    out = {f"{p}/acc_iou0.5": float(hit.mean()), f"{p}/mean_iou": float(overlap.mean()),
           f"{p}/chance": float(self.chance.mean())}
    for lang in sorted(set(self.langs or ())):
      keep = np.array([l == lang for l in self.langs])
      out[f"{p}/{lang}/acc_iou0.5"] = float(hit[keep].mean())
    return out
