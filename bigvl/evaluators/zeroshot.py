"""Zero-shot classification: class names × prompt templates per language, top-1 and top-5."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from bigvl.evaluators import common, metrics


class ZeroShotEvaluator:
  """Logs `{prefix}/{lang}/top1` and `/top5` for each language given, and `{prefix}/chance_top1`.

  `images` are preprocessed images in memory or `common.Rows` read lazily; `labels` are the class
  indices, or None when the rows carry a "label" column (a large set: each process then reads only
  its own block, labels included).
  """

  def __init__(self, *, images: np.ndarray | common.Rows, labels: np.ndarray | None,
               classnames: Mapping[str, Sequence[str]], templates: Mapping[str, Sequence[str]],
               tokenizer, every: int = 0, prefix: str = "zeroshot", batch_size: int | None = None):
    if set(classnames) != set(templates):
      raise ValueError(f"classnames languages {sorted(classnames)} != templates {sorted(templates)}")
    sizes = {len(v) for v in classnames.values()}
    if len(sizes) != 1:
      raise ValueError(f"every language needs the same classes; got sizes {sorted(sizes)}")
    self.images = images if isinstance(images, common.Rows) else common.Rows.of(image=images)
    if labels is not None:
      labels = np.asarray(labels)
      if len(labels) != len(self.images):
        raise ValueError(f"{len(labels)} labels for {len(self.images)} images")
    self.labels = labels
    self.classnames, self.templates = dict(classnames), dict(templates)
    self.tokenizer, self.every, self.prefix = tokenizer, every, prefix
    self.batch_size = batch_size

  @property
  def num_classes(self) -> int:
    return len(next(iter(self.classnames.values())))

  def run(self, encoder: common.Encoder) -> dict[str, float]:
    got = encoder.embed("image", self.images, self.batch_size)
    zimg = got["embedding"]
    labels = self.labels if self.labels is not None else got["label"]
    if labels.min() < 0 or labels.max() >= self.num_classes:
      raise ValueError(f"{self.prefix}: labels outside [0, {self.num_classes})")
    out = {}
    for lang in sorted(self.classnames):
      zcls = common.class_embeddings(encoder, self.tokenizer, list(self.classnames[lang]),
                                     list(self.templates[lang]), self.batch_size)
      logits = zimg @ zcls.T
      out[f"{self.prefix}/{lang}/top1"] = metrics.topk_accuracy(logits, labels, 1)
      out[f"{self.prefix}/{lang}/top5"] = metrics.topk_accuracy(logits, labels, 5)
    out[f"{self.prefix}/chance_top1"] = 1.0 / self.num_classes
    return out
