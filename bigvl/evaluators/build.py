"""Evaluators from `config.evals`: each entry names its kind, its data source and its schedule.

  evals.zeroshot   = eval_config(source="world", split="eval_heldout")        # the embedded world
  evals.imagenet   = eval_config(kind="zeroshot", source="tfds:imagenet2012", split="validation",
                                 data_dir="gs://BUCKET/tfds", classnames="en:imagenet_en.txt")
  evals.f30k_cn    = eval_config(kind="retrieval", source="jsonl:/data/f30k-cn_test.jsonl")

(`bigvl.train.config_lib.eval_config` lists every key.) An entry whose source is "" is off.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import ml_collections
import numpy as np

from bigvl.evaluators import retrieval, templates as templates_lib, zeroshot

log = logging.getLogger("bigvl")


def parse_source(source: str) -> tuple[str, str]:
  """"world" → ("world", ""); "tfds:NAME" → ("tfds", NAME); "jsonl:PATH" → ("jsonl", PATH)."""
  if source == "world":
    return "world", ""
  kind, sep, where = source.partition(":")
  if sep and kind in ("tfds", "jsonl") and where:
    return kind, where
  raise ValueError(f"source={source!r}: use 'world', 'tfds:NAME' (e.g. tfds:imagenet2012) or "
                   "'jsonl:PATH' (one {\"image\": …, \"caption\": [...]} per line)")


def kind_of(name: str, ev: ml_collections.ConfigDict) -> str:
  """The entry's kind: its `kind`, else from its name (zeroshot*, retrieval*)."""
  kind = ev.get("kind", "") or next(
      (k for k in ("zeroshot", "retrieval") if name.startswith(k)), "")
  if kind not in ("zeroshot", "retrieval"):
    raise ValueError("set kind='zeroshot' or 'retrieval' (or start the entry's name with "
                     "zeroshot / retrieval)")
  return kind


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
  (bigvl.evaluators.common.format_prompt); any other file one name per line, in the language its
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


def build_one(name: str, ev: ml_collections.ConfigDict, *, tokenizer, image_size: int,
              world_dir: str = ""):
  """One evaluator, or None when the entry's source is "" (off)."""
  from bigvl.evaluators import sources  # the data pipeline: not needed to validate a config
  if not ev.get("source", "world"):
    return None
  try:
    kind = kind_of(name, ev)
    where_kind, where = parse_source(ev.get("source", "world"))
  except ValueError as e:
    raise ValueError(f"evals.{name}: {e}") from None
  langs = [s for s in ev.get("langs", "").split(",") if s]
  limit = ev.get("max_examples", 0)
  common_kw = dict(tokenizer=tokenizer, every=ev.every, prefix=name, batch_size=ev.batch_size)

  if where_kind == "world":
    if not world_dir:
      raise ValueError(f"evals.{name}: source 'world' needs data.kind='synthetic_world'")
    from data_pipelines import synthetic_world
    data, metas = sources.world(world_dir, ev.split, image_size, limit)
  elif where_kind == "jsonl":
    data = sources.jsonl(where, image_size, ev.get("data_dir", ""), limit)
  else:
    data = sources.tfds_source(
        where, ev.split, image_size, data_dir=ev.get("data_dir", ""),
        image_key=ev.get("image_key", "image"),
        label_key=ev.get("label_key", "label") if kind == "zeroshot" else "",
        caption_key=ev.get("caption_key", "captions/text") if kind == "retrieval" else "",
        max_examples=limit)
  log.info("evals.%s: %s on %d images from %s", name, kind, len(data), ev.get("source", "world"))

  if kind == "retrieval":
    if not data.captions or not all(data.captions):
      raise ValueError(f"evals.{name}: retrieval needs at least one caption per image")
    texts, owner = sources.split_langs(data.captions)
    return retrieval.RetrievalEvaluator(images=data.images, texts=texts, text_image=owner,
                                        **common_kw)

  # ------------------------------------------------------------------ zero-shot
  labels = data.labels
  if where_kind == "world":
    classes_all = np.array([m["class"] for m in metas])
    classes = (np.unique(classes_all) if ev.get("classes", "split") == "split"
               else np.arange(synthetic_world.NUM_CLASSES))
    labels = np.searchsorted(classes, classes_all)
    default_names = {lang: [synthetic_world.zeroshot_name(k, lang) for k in classes]
                     for lang in ("en", "zh")}
    default_templates = synthetic_world.ZEROSHOT_TEMPLATES
  else:
    default_names = {"en": data.label_names} if data.label_names else {}
    default_templates = "clip"
    if data.label_names and all(re.fullmatch(r"n\d{8}", s) for s in data.label_names[:10]):
      log.warning("evals.%s: the class names are WordNet ids (%s …): give classnames files",
                  name, data.label_names[0])
  names = load_classnames(ev.classnames, langs) if ev.get("classnames", "") else default_names
  if not names:
    raise ValueError(f"evals.{name}: zero-shot needs class names: set classnames (a file)")
  spec = ev.get("templates", "")
  table = (templates_lib.load(spec) if spec else
           templates_lib.load(default_templates) if isinstance(default_templates, str)
           else dict(default_templates))
  names = _pick_langs(names, langs, "class names", name)
  table = _pick_langs(table, sorted(names), "templates", name)
  if labels is None and where_kind != "tfds":
    raise ValueError(f"evals.{name}: zero-shot needs a label per image (\"label\" on every line)")
  return zeroshot.ZeroShotEvaluator(images=data.images, labels=labels, classnames=names,
                                    templates=table, **common_kw)


def build_all(evals: ml_collections.ConfigDict, *, tokenizer, image_size: int,
              world_dir: str = "", only: list[str] | None = None) -> dict[str, Any]:
  """Every entry of `evals` that is on (or those named in `only`), by name."""
  if only:
    unknown = sorted(set(only) - set(evals))
    if unknown:
      raise ValueError(f"no eval named {unknown}; the config has {sorted(evals)}")
  out = {}
  for name, ev in evals.items():
    if only and name not in only:
      continue
    made = build_one(name, ev, tokenizer=tokenizer, image_size=image_size, world_dir=world_dir)
    if made is not None:
      out[name] = made
  return out
