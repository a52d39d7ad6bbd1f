"""Zero-shot classification: class names × prompt templates per language, top-1 and top-5."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from bigvl.evaluators import common, metrics


class ZeroShotEvaluator:
  """Logs `{prefix}/{lang}/top1` and `/top5` for each language given."""

  def __init__(self, *, images: np.ndarray, labels: np.ndarray,
               classnames: Mapping[str, Sequence[str]], templates: Mapping[str, Sequence[str]],
               tokenizer, every: int = 0, prefix: str = "zeroshot"):
    if set(classnames) != set(templates):
      raise ValueError(f"classnames languages {sorted(classnames)} != templates {sorted(templates)}")
    self.images, self.labels = images, np.asarray(labels)
    self.classnames, self.templates = dict(classnames), dict(templates)
    self.tokenizer, self.every, self.prefix = tokenizer, every, prefix

  def run(self, encoder: common.Encoder) -> dict[str, float]:
    zimg = encoder.images(self.images)
    out = {}
    for lang in sorted(self.classnames):
      zcls = common.class_embeddings(encoder, self.tokenizer, list(self.classnames[lang]),
                                     list(self.templates[lang]))
      logits = zimg @ zcls.T
      out[f"{self.prefix}/{lang}/top1"] = metrics.topk_accuracy(logits, self.labels, 1)
      out[f"{self.prefix}/{lang}/top5"] = metrics.topk_accuracy(logits, self.labels, 5)
    num_classes = len(next(iter(self.classnames.values())))
    out[f"{self.prefix}/chance_top1"] = 1.0 / num_classes
    return out
