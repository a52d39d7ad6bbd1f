"""Image↔text retrieval: Recall@1/5/10 both ways and MR, pooled over languages and per language."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from bigvl.evaluators import common, metrics


class RetrievalEvaluator:
  """`texts[lang]` are captions, `text_image[lang][j]` the index of caption j's image.

  Logs `{prefix}/i2t/r1` … over all languages' captions together (an image then has one caption per
  language, so image→text is a hit when any of them is retrieved), and `{prefix}/{lang}/…` per language.
  """

  def __init__(self, *, images: np.ndarray, texts: Mapping[str, Sequence[str]],
               text_image: Mapping[str, Sequence[int]], tokenizer, every: int = 0,
               prefix: str = "retrieval"):
    self.images = images
    self.texts = {k: list(v) for k, v in texts.items()}
    self.text_image = {k: np.asarray(v) for k, v in text_image.items()}
    self.tokenizer, self.every, self.prefix = tokenizer, every, prefix

  def run(self, encoder: common.Encoder) -> dict[str, float]:
    zimg = encoder.images(self.images)
    ztxt, owners = {}, {}
    for lang in sorted(self.texts):
      ids, mask = self.tokenizer.encode_batch(self.texts[lang])
      ztxt[lang], owners[lang] = encoder.texts(ids, mask), self.text_image[lang]
    out = {}
    langs = sorted(ztxt)
    groups = {None: langs} | ({lang: [lang] for lang in langs} if len(langs) > 1 else {})
    for group, members in groups.items():
      z = np.concatenate([ztxt[m] for m in members])
      owner = np.concatenate([owners[m] for m in members])
      name = self.prefix if group is None else f"{self.prefix}/{group}"
      for k, v in metrics.retrieval_recalls(zimg @ z.T, owner).items():
        out[f"{name}/{k}"] = v
      if group is None:
        for k, v in metrics.retrieval_chance(len(zimg), owner, 1).items():
          out[f"{name}/chance/{k}"] = v
    return out
