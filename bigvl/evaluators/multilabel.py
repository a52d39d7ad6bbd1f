"""Open-vocabulary multi-label recognition: every label of a picture, scored against each label's
prompt embedding.

Metrics (prefix = the entry's name): `{prefix}/zeroshot_map` (the towers' own image embedding
against the label prompts), `{prefix}/map` (the same after the system's `adapt_image`, when it
gives one: the text-as-image adapter), `{prefix}/chance_map` (the expected mAP of scores that carry
no information, from the label frequencies), and CF1 / OF1 of the top-`topk` labels per picture
(`{prefix}/cf1`, `{prefix}/of1`, and `zeroshot_` ones). mAP is the mean over labels with at least
one positive picture of the non-interpolated average precision.

Sources: the scene world ("world": its evaluation scenes, 1 to 4 objects each, every label a
(colour, shape) class), COCO instances JSON ("coco:instances_val2014.json", categories per
image), a VOC2007 directory ("voc2007:VOCdevkit/VOC2007", the split's ImageSets/Main lists;
difficult labels are ignored), a NUS-WIDE directory ("nuswide:ROOT", Concepts81 and the
TrainTestLabels lists) and a plain label list ("labels:FILE", `image<TAB>label,label` per line).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np

from bigvl.evaluators import common

log = logging.getLogger("bigvl")
SOURCES = ("world", "coco", "voc2007", "nuswide", "labels")


def _langs(entry: Mapping[str, Any]) -> list[str]:
  return [s for s in str(entry.get("langs", "en")).split(",") if s]


def prompt_langs(names: Sequence[Mapping[str, str]], templates: Mapping[str, Sequence[str]],
                 langs: Sequence[str]) -> list[str]:
  """The languages of `langs` that have templates and a name for every label: those a label's
  prompt embedding averages (here and in the text-as-image adapter's training)."""
  return [l for l in langs if l in templates and all(l in n for n in names)]


class MultiLabelEvaluator:
  requires = ("embed_image", "embed_text")   # and "adapt_image" where the system has an adapter

  @classmethod
  def config_keys(cls) -> dict[str, Any]:
    return dict(templates="simple",   # label prompts: a name of evaluators/templates.py or a JSON
                langs="en,zh",        # languages of the prompts (a language without names: skipped)
                topk=3)               # labels predicted per picture for CF1 / OF1

  @classmethod
  def validate_config(cls, name: str, entry: Mapping[str, Any]) -> None:
    from bigvl.evaluators import templates
    bad = [s for s in _langs(entry) if s not in ("en", "zh")]
    if bad:
      raise ValueError(f"evals.{name}.langs: {bad} not in ['en', 'zh']")
    if entry.get("topk", 3) < 1:
      raise ValueError(f"evals.{name}.topk={entry.get('topk')}: must be >= 1")
    spec = entry.get("templates", "simple")
    if spec in templates.NAMED:
      return
    templates.load(spec)

  @classmethod
  def from_config(cls, name: str, entry: Mapping[str, Any], *, tokenizer, image_size: int,
                  world_dir: str = "") -> "MultiLabelEvaluator":
    from bigvl.evaluators import kinds, public_formats, sources, templates
    where_kind, where = kinds.parse_source(entry.get("source", "world"))
    limit = entry.get("max_examples", 0)
    root = entry.get("data_dir", "")
    if where_kind == "world":
      if not world_dir:
        raise ValueError(f"evals.{name}: source 'world' needs the scene world (data.kind="
                         "'synthetic_world')")
      meta = sources.scenes_meta(world_dir)
      data, metas = sources.scenes(world_dir, sources.split_or(entry, "eval"), image_size, limit)
      names = meta["labels"]
      labels = np.zeros((len(metas), len(names)), np.int8)
      for i, m in enumerate(metas):
        labels[i, m["labels"]] = 1
      images = data.images
    else:
      if where_kind == "coco":
        found = public_formats.coco_instances(where, root)
      elif where_kind == "voc2007":
        found = public_formats.voc2007(where, sources.split_or(entry, "test"))
      elif where_kind == "nuswide":
        found = public_formats.nus_wide(where, sources.split_or(entry, "Test"))
      elif where_kind == "labels":
        found = public_formats.label_list(where)
      else:
        raise ValueError(f"evals.{name}: multilabel reads {list(SOURCES)}, not "
                         f"{entry.get('source')!r}")
      paths, labels = list(found.image_paths), np.asarray(found.labels)
      if limit:
        paths, labels = paths[:limit], labels[:limit]
      names = [{"en": n} for n in found.names]
      images = sources.image_files(paths, image_size, f"evals.{name} ({where})")
    return cls(images=images, labels=labels, names=names,
               templates=templates.load(entry.get("templates", "simple")), langs=_langs(entry),
               tokenizer=tokenizer, prefix=name, every=entry.get("every", 0),
               batch_size=entry.get("batch_size"), topk=entry.get("topk", 3))

  def __init__(self, *, images: common.Rows | np.ndarray, labels: np.ndarray,
               names: Sequence[Mapping[str, str]], templates: Mapping[str, Sequence[str]],
               langs: Sequence[str], tokenizer, prefix: str = "multilabel", every: int = 0,
               batch_size: int | None = None, topk: int = 3):
    self.images = images if isinstance(images, common.Rows) else common.Rows.of(image=images)
    self.labels = np.asarray(labels)
    if self.labels.shape != (len(self.images), len(names)):
      raise ValueError(f"{prefix}: labels {self.labels.shape} for {len(self.images)} images and "
                       f"{len(names)} label names")
    self.langs = prompt_langs(names, templates, langs)
    if not self.langs:
      raise ValueError(f"{prefix}: no language among {list(langs)} has both templates and every "
                       "label's name")
    self.names, self.templates = [dict(n) for n in names], templates
    self.tokenizer, self.prefix, self.every = tokenizer, prefix, every
    self.batch_size, self.topk = batch_size, topk

  def label_embeddings(self, predictor: common.Predictor) -> np.ndarray:
    """(C, d): per language the mean of the prompts' unit embeddings; the languages averaged."""
    tok = common.as_written(self.tokenizer)
    z = sum(common.class_embeddings(predictor, tok, [n[lang] for n in self.names],
                                    self.templates[lang], self.batch_size)
            for lang in self.langs)
    return z / np.linalg.norm(z, axis=-1, keepdims=True)

  def scores(self, predictor: common.Predictor, name: str = "embed_image") -> np.ndarray:
    """(N, C) cosine scores of the pictures' embeddings (predictor `name`) and the labels."""
    z = predictor.run(name, self.images, self.batch_size)["embedding"]
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    return z @ self.label_embeddings(predictor).T

  def run(self, predictor: common.Predictor) -> dict[str, float]:
    from bigvl.evaluators import multilabel_metrics as mm
    p = self.prefix
    out = {f"{p}/chance_map": float(mm.chance_map(self.labels))}
    runs = [("zeroshot_", "embed_image")]
    if "adapt_image" in predictor.names:
      runs.append(("", "adapt_image"))
    for tag, fn in runs:
      s = self.scores(predictor, fn)
      ap = mm.mean_average_precision(s, self.labels)
      f1 = mm.topk_f1(s, self.labels, k=min(self.topk, self.labels.shape[1]))
      out[f"{p}/{tag}map"] = float(ap["map"])
      out[f"{p}/{tag}cf1"] = float(f1["cf1"])
      out[f"{p}/{tag}of1"] = float(f1["of1"])
    out[f"{p}/classes_scored"] = float(ap["classes_scored"])
    return out
