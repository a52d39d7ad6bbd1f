"""Image↔text retrieval: Recall@1/5/10 both ways and MR, pooled over languages and per language."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from bigvl.evaluators import common, metrics


class RetrievalEvaluator:
  """`texts[lang]` are captions, `text_image[lang][j]` the index of caption j's image.

  Logs `{prefix}/i2t/r1` … over all languages' captions together (an image then has its captions in
  every language, so image→text is a hit when any of them is retrieved), and `{prefix}/{lang}/…` per
  language when there are several. A caption string that belongs to several images is a hit for each
  of them (`metrics.caption_owners`).
  """

  requires = ("embed_image", "embed_text")

  @classmethod
  def config_keys(cls) -> dict[str, Any]:
    return dict(
        image_key="image",                # TFDS feature names
        caption_key="captions/text",
    )

  @classmethod
  def validate_config(cls, name: str, entry: Mapping[str, Any]) -> None:
    pass

  @classmethod
  def from_config(cls, name: str, entry: Mapping[str, Any], *, tokenizer, image_size: int,
                  world_dir: str = "") -> "RetrievalEvaluator":
    """The evaluator of entry `name` (its source is on)."""
    from bigvl.evaluators import sources  # the data pipeline: not needed to validate a config
    data = sources.open_entry(name, entry, image_size=image_size, world_dir=world_dir,
                              caption_key=entry.get("caption_key", "captions/text"))
    if not data.captions or not all(data.captions):
      raise ValueError(f"evals.{name}: retrieval needs at least one caption per image")
    texts, owner = sources.split_langs(data.captions)
    return cls(images=data.images, texts=texts, text_image=owner, tokenizer=tokenizer,
               every=entry.get("every", 0), prefix=name, batch_size=entry.get("batch_size"))

  def __init__(self, *, images: np.ndarray | common.Rows, texts: Mapping[str, Sequence[str]],
               text_image: Mapping[str, Sequence[int]], tokenizer, every: int = 0,
               prefix: str = "retrieval", batch_size: int | None = None):
    if set(texts) != set(text_image):
      raise ValueError(f"texts languages {sorted(texts)} != text_image {sorted(text_image)}")
    self.images = images if isinstance(images, common.Rows) else common.Rows.of(image=images)
    self.texts = {k: list(v) for k, v in texts.items()}
    self.text_image = {k: np.asarray(v, np.int64) for k, v in text_image.items()}
    for lang, owner in self.text_image.items():
      if len(owner) != len(self.texts[lang]):
        raise ValueError(f"{lang}: {len(owner)} owners for {len(self.texts[lang])} texts")
    self.tokenizer, self.every, self.prefix = tokenizer, every, prefix
    self.batch_size = batch_size

  def run(self, predictor: common.Predictor) -> dict[str, float]:
    zimg = predictor.run("embed_image", self.images, self.batch_size)["embedding"]
    ztxt = {}
    for lang in sorted(self.texts):
      ids, mask = self.tokenizer.encode_batch(self.texts[lang])
      ztxt[lang] = predictor.run("embed_text", common.Rows.of(text=ids, text_mask=mask),
                                 self.batch_size)["embedding"]
    out = {}
    langs = sorted(ztxt)
    groups = {None: langs} | ({lang: [lang] for lang in langs} if len(langs) > 1 else {})
    for group, members in groups.items():
      z = np.concatenate([ztxt[m] for m in members])
      texts = [t for m in members for t in self.texts[m]]
      owners = metrics.caption_owners(texts, np.concatenate([self.text_image[m] for m in members]))
      name = self.prefix if group is None else f"{self.prefix}/{group}"
      for k, v in metrics.retrieval_recalls(zimg @ z.T, owners).items():
        out[f"{name}/{k}"] = v
      if group is None:
        for k, v in metrics.retrieval_chance(len(zimg), owners, 1).items():
          out[f"{name}/chance/{k}"] = v
    return out
