"""Image↔text retrieval: Recall@1/5/10 both ways and MR, pooled over languages and per language."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from bigvl.evaluators import common, metrics


class RetrievalEvaluator:
  """`texts[lang]` are captions, `text_image[lang][j]` the index of caption j's image.

  Logs `{prefix}/i2t/r1` … over all languages' captions together (an image then has its captions in
  every language, so image→text is a hit when any of them is retrieved), and `{prefix}/{lang}/…` per
  language when there are several, over the images that have a caption in that language.

  By default the reference M²-Encoder evaluation (its eval_retrieval.py) is followed exactly:
  captions are lower-cased and their curly quotes straightened before they are grouped
  (`text_preprocess="reference"`; "none" keeps them as written), and repeated caption strings
  follow its rule in each direction (`repeated_captions="reference"`, `metrics.
  reference_positives`): a caption hits every image that has it, an image hits only the last copy
  of each of its captions. `repeated_captions="every_copy"` (bigvl's earlier rule) also counts an
  image's hit on any copy of its captions; on sets with repeats it gives a higher image→text
  recall. Captions are otherwise used as written (no stripping: the GLM tokenizer keeps a trailing
  space as a piece) and tokenized without further lower-casing.
  """

  requires = ("embed_image", "embed_text")

  @classmethod
  def config_keys(cls) -> dict[str, Any]:
    return dict(
        image_key="image",                # TFDS feature names
        caption_key="captions/text",
        text_preprocess="reference",      # "reference": lower-case, straight quotes | "none"
        repeated_captions="reference",    # "reference" | "every_copy" (see the class docstring)
    )

  @classmethod
  def validate_config(cls, name: str, entry: Mapping[str, Any]) -> None:
    for key, allowed in (("text_preprocess", ("reference", "none")),
                         ("repeated_captions", ("reference", "every_copy"))):
      value = entry.get(key, "reference")
      if value not in allowed:
        raise ValueError(f"evals.{name}.{key}={value!r}: use one of {list(allowed)}")

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
               every=entry.get("every", 0), prefix=name, batch_size=entry.get("batch_size"),
               text_preprocess=entry.get("text_preprocess", "reference"),
               repeated_captions=entry.get("repeated_captions", "reference"))

  def __init__(self, *, images: np.ndarray | common.Rows, texts: Mapping[str, Sequence[str]],
               text_image: Mapping[str, Sequence[int]], tokenizer, every: int = 0,
               prefix: str = "retrieval", batch_size: int | None = None,
               text_preprocess: str = "reference", repeated_captions: str = "reference"):
    if set(texts) != set(text_image):
      raise ValueError(f"texts languages {sorted(texts)} != text_image {sorted(text_image)}")
    self.images = images if isinstance(images, common.Rows) else common.Rows.of(image=images)
    prep = metrics.reference_text if text_preprocess == "reference" else (lambda t: t)
    self.texts = {k: [prep(t) for t in v] for k, v in texts.items()}
    self.repeated_captions = repeated_captions
    self.text_image = {k: np.asarray(v, np.int64) for k, v in text_image.items()}
    for lang, owner in self.text_image.items():
      if len(owner) != len(self.texts[lang]):
        raise ValueError(f"{lang}: {len(owner)} owners for {len(self.texts[lang])} texts")
    self.tokenizer, self.every, self.prefix = common.as_written(tokenizer), every, prefix
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
      owner = np.concatenate([self.text_image[m] for m in members])
      # A language's group: the images with a caption in it (a set need not caption every image
      # in every language), renumbered.
      present = np.unique(owner)
      owner = np.searchsorted(present, owner)
      if self.repeated_captions == "reference":
        owners, image_texts = metrics.reference_positives(texts, owner)
      else:
        owners, image_texts = metrics.caption_owners(texts, owner), None
      name = self.prefix if group is None else f"{self.prefix}/{group}"
      sim = zimg[present] @ z.T
      for k, v in metrics.retrieval_recalls(sim, owners, image_texts=image_texts).items():
        out[f"{name}/{k}"] = v
      if group is None:
        for k, v in metrics.retrieval_chance(len(present), owners, 1, image_texts).items():
          out[f"{name}/chance/{k}"] = v
    return out
