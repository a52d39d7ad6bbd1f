"""Zero-shot classification: class names × prompt templates per language, top-1 and top-5."""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from bigvl.evaluators import common, metrics, templates as templates_lib

log = logging.getLogger("bigvl")


class ZeroShotEvaluator:
  """Logs `{prefix}/{lang}/top1` and `/top5` for each language given, and `{prefix}/chance_top1`.

  `images` are preprocessed images in memory or `common.Rows` read lazily; `labels` are the class
  indices, or None when the rows carry a "label" column (a large set: each process then reads only
  its own block, labels included).
  """

  requires = ("embed_image", "embed_text")

  @classmethod
  def config_keys(cls) -> dict[str, Any]:
    return dict(
        classes="split",        # world: the split's classes or "all" of the world's
        classnames="",          # "" = the source's; a file, or "en:FILE,zh:FILE"
        templates="",           # "clip", "simple" or a JSON file ("": the world's own for the
                                # world, else "clip")
        langs="",               # languages, e.g. "zh" ("": all that have class names)
        image_key="image",      # TFDS feature names
        label_key="label",
    )

  @classmethod
  def validate_config(cls, name: str, entry: Mapping[str, Any]) -> None:
    classes = entry.get("classes", "split")
    if classes not in ("split", "all"):
      raise ValueError(f"evals.{name}.classes={classes!r}: 'split' or 'all'")

  @classmethod
  def from_config(cls, name: str, entry: Mapping[str, Any], *, tokenizer, image_size: int,
                  world_dir: str = "") -> "ZeroShotEvaluator":
    """The evaluator of entry `name` (its source is on). The world's class names and templates
    come from its world.json."""
    from bigvl.evaluators import sources  # the data pipeline: not needed to validate a config
    data = sources.open_entry(name, entry, image_size=image_size, world_dir=world_dir,
                              label_key=entry.get("label_key", "label"))
    langs = [s for s in entry.get("langs", "").split(",") if s]
    labels = data.labels
    if entry.get("source", "world") == "world":
      world = sources.world_meta(world_dir)
      classes = (np.unique(labels) if entry.get("classes", "split") == "split"
                 else np.arange(len(world["classes"])))
      labels = np.searchsorted(classes, labels)
      default_names = {lang: [names[k] for k in classes]
                       for lang, names in world["zeroshot_names"].items()}
      default_templates = world["zeroshot_templates"]
    else:
      default_names = {"en": data.label_names} if data.label_names else {}
      default_templates = "clip"
      if data.label_names and all(re.fullmatch(r"n\d{8}", s) for s in data.label_names[:10]):
        log.warning("evals.%s: the class names are WordNet ids (%s …): give classnames files",
                    name, data.label_names[0])
    names = (load_classnames(entry["classnames"], langs) if entry.get("classnames", "")
             else default_names)
    if not names:
      raise ValueError(f"evals.{name}: zero-shot needs class names: set classnames (a file)")
    spec = entry.get("templates", "")
    table = (templates_lib.load(spec) if spec else
             templates_lib.load(default_templates) if isinstance(default_templates, str)
             else dict(default_templates))
    names = _pick_langs(names, langs, "class names", name)
    table = _pick_langs(table, sorted(names), "templates", name)
    if labels is None and not entry.get("source", "").startswith("tfds:"):
      raise ValueError(f"evals.{name}: zero-shot needs a label per image (\"label\" on every "
                       "line)")
    return cls(images=data.images, labels=labels, classnames=names, templates=table,
               tokenizer=tokenizer, every=entry.get("every", 0), prefix=name,
               batch_size=entry.get("batch_size"))

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
    # Class names and templates as written: the reference's zero-shot classifier does not
    # lower-case.
    self.tokenizer, self.every, self.prefix = common.as_written(tokenizer), every, prefix
    self.batch_size = batch_size

  @property
  def num_classes(self) -> int:
    return len(next(iter(self.classnames.values())))

  def run(self, predictor: common.Predictor) -> dict[str, float]:
    got = predictor.run("embed_image", self.images, self.batch_size)
    zimg = got["embedding"]
    labels = self.labels if self.labels is not None else got["label"]
    if labels.min() < 0 or labels.max() >= self.num_classes:
      raise ValueError(f"{self.prefix}: labels outside [0, {self.num_classes})")
    out = {}
    for lang in sorted(self.classnames):
      zcls = common.class_embeddings(predictor, self.tokenizer, list(self.classnames[lang]),
                                     list(self.templates[lang]), self.batch_size)
      logits = zimg @ zcls.T
      out[f"{self.prefix}/{lang}/top1"] = metrics.topk_accuracy(logits, labels, 1)
      out[f"{self.prefix}/{lang}/top5"] = metrics.topk_accuracy(logits, labels, 5)
    out[f"{self.prefix}/chance_top1"] = 1.0 / self.num_classes
    return out


def _name(x: Any) -> str | dict[str, str]:
  """A class name from a JSON file: a string, or a mapping of forms ({"name": …, "plural": …})."""
  if isinstance(x, dict):
    if "name" not in x:
      raise ValueError(f"class name {x!r} has no \"name\" form")
    return {str(k): str(v) for k, v in x.items()}
  return str(x)


def load_classnames(spec: str, langs: list[str]) -> dict[str, list[str | dict[str, str]]]:
  """Class names from files: "PATH" or "en:PATH,zh:PATH". A `.json` file holds {"en": [...], ...}
  (or one list), where a name may also be a mapping of forms for templates such as "two {plural}."
  (bigvl.data.prompts.format_prompt); any other file one name per line, in the language its
  prefix names (or, without one, the only language of `langs`, else guessed from the names)."""
  table: dict[str, list[str]] = {}
  for item in [s for s in spec.split(",") if s]:
    lang, sep, path = item.partition(":")
    if not sep or len(lang) > 3:
      lang, path = "", item
    if not os.path.isfile(path):
      raise FileNotFoundError(f"classnames file {path!r} not found")
    with open(path, encoding="utf-8") as f:
      if path.endswith(".json"):
        data = json.load(f)
        if isinstance(data, dict):
          table.update({k: [_name(x) for x in v] for k, v in data.items()})
          continue
        names = [_name(x) for x in data]
      else:
        names = [line.strip() for line in f if line.strip()]
    if not lang:
      from bigvl.evaluators import sources
      lang = langs[0] if len(langs) == 1 else sources.guess_lang("".join(names))
    table[lang] = names
  return table


def _pick_langs(table: dict[str, Any], langs: list[str], what: str, name: str) -> dict[str, Any]:
  if not langs:
    return table
  missing = [lang for lang in langs if lang not in table]
  if missing:
    raise ValueError(f"evals.{name}: no {what} for language(s) {missing} (have {sorted(table)})")
  return {lang: table[lang] for lang in langs}
