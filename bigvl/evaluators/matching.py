"""Image–text matching against near misses: is this the picture's caption, or one that changes a
single object's colour or shape? (The scene world's `captions` and `near_miss`.)

Metrics (prefix = the entry's name): `{p}/pair_acc`, the share of (picture, language) pairs whose
true caption scores above its near miss (chance 0.5), and `{p}/acc`, the share of captions on the
right side of 0 (true ones above, near misses below; chance 0.5), with `{p}/{lang}/pair_acc`.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from bigvl.evaluators import common


class MatchingEvaluator:
  requires = ("itm_score",)

  @classmethod
  def config_keys(cls) -> dict[str, Any]:
    return {}

  @classmethod
  def validate_config(cls, name: str, entry: Mapping[str, Any]) -> None:
    if entry.get("source", "world") != "world":
      raise ValueError(f"evals.{name}: itm reads the scene world ('world') only")

  @classmethod
  def from_config(cls, name: str, entry: Mapping[str, Any], *, tokenizer, image_size: int,
                  world_dir: str = "") -> "MatchingEvaluator":
    from bigvl.evaluators import sources
    cls.validate_config(name, entry)
    if not world_dir:
      raise ValueError(f"evals.{name}: source 'world' needs the scene world")
    data, metas = sources.scenes(world_dir, sources.split_or(entry, "eval"), image_size,
                                 entry.get("max_examples", 0))
    return cls(images=data.images, metas=metas, tokenizer=tokenizer, prefix=name,
               every=entry.get("every", 0), batch_size=entry.get("batch_size"))

  def __init__(self, *, images: common.Rows, metas, tokenizer, prefix: str = "itm",
               every: int = 0, batch_size: int | None = None):
    self.images, self.prefix, self.every, self.batch_size = images, prefix, every, batch_size
    rows = []   # (picture, language, caption, is the true one)
    for i, m in enumerate(metas):
      for lang in sorted(m["captions"]):
        rows += [(i, lang, m["captions"][lang], 1), (i, lang, m["near_miss"][lang], 0)]
    self.picture = np.array([r[0] for r in rows])
    self.lang = np.array([r[1] for r in rows])
    self.truth = np.array([r[3] for r in rows])
    self.ids, self.mask = common.as_written(tokenizer).encode_batch([r[2] for r in rows])

  def run(self, predictor: common.Predictor) -> dict[str, float]:
    rows = common.Rows(len(self.picture), lambda idx: {
        **self.images.load(self.picture[idx]), "text": self.ids[idx], "text_mask": self.mask[idx]})
    score = predictor.run("itm_score", rows, self.batch_size)["score"]
    p = self.prefix
    true, miss = score[self.truth == 1], score[self.truth == 0]   # rows alternate true, miss
    wins = true > miss
    out = {f"{p}/pair_acc": float(wins.mean()),
           f"{p}/acc": float(((score > 0) == (self.truth == 1)).mean())}
    langs = self.lang[self.truth == 1]
    for lang in sorted(set(langs)):
      out[f"{p}/{lang}/pair_acc"] = float(wins[langs == lang].mean())
    return out
