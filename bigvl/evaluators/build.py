"""Evaluators from `config.evals`: each entry names its kind, its data source and its schedule, and
is built by its kind's class in the table of bigvl/evaluators/kinds.py (which lists every key).

  evals.zeroshot   = eval_config(kind="zeroshot", source="world", split="eval_heldout")
  evals.f30k_cn    = eval_config(kind="retrieval", source="jsonl:/data/f30k-cn_test.jsonl")

An entry whose source is "" is off.
"""

from __future__ import annotations

import logging
from typing import Any, Collection

import ml_collections

from bigvl.evaluators.kinds import KINDS, kind_of, parse_source  # noqa: F401  (the config's API)

log = logging.getLogger("bigvl")


def _kind(name: str, entry: ml_collections.ConfigDict) -> str:
  try:
    return kind_of(name, entry)
  except ValueError as e:
    raise ValueError(f"evals.{name}: {e}") from None


def build_one(name: str, entry: ml_collections.ConfigDict, *, tokenizer, image_size: int,
              world_dir: str = ""):
  """One evaluator, or None when the entry's source is "" (off)."""
  if not entry.get("source", "world"):
    return None
  kind = _kind(name, entry)
  made = KINDS[kind].from_config(name, entry, tokenizer=tokenizer, image_size=image_size,
                                 world_dir=world_dir)
  size, what = ((len(made.images), "images") if hasattr(made, "images")
                else (len(made), "items"))
  log.info("evals.%s: %s on %d %s from %s", name, kind, size, what, entry.get("source", "world"))
  return made


def missing_predictors(name: str, entry: ml_collections.ConfigDict,
                       predictors: Collection[str]) -> list[str]:
  """The predictors entry `name`'s kind runs that are not in `predictors`."""
  return [p for p in KINDS[_kind(name, entry)].requires if p not in predictors]


def build_all(evals: ml_collections.ConfigDict, *, tokenizer, image_size: int,
              world_dir: str = "", only: list[str] | None = None,
              predictors: Collection[str] | None = None) -> dict[str, Any]:
  """Every entry of `evals` that is on (or those named in `only`), by name. With `predictors` (the
  names a system gives), an entry whose kind needs another one fails before any data is read."""
  if only:
    unknown = sorted(set(only) - set(evals))
    if unknown:
      raise ValueError(f"no eval named {unknown}; the config has {sorted(evals)}")
  chosen = {name: entry for name, entry in evals.items()
            if (not only or name in only) and entry.get("source", "world")}
  if predictors is not None:
    for name, entry in chosen.items():
      missing = missing_predictors(name, entry, predictors)
      if missing:
        raise ValueError(f"evals.{name}: kind {_kind(name, entry)!r} needs the predictor(s) "
                         f"{missing}, which this system does not give (it gives "
                         f"{sorted(predictors)}): set evals.{name}.source='' to turn it off")
  out = {}
  for name, entry in chosen.items():
    out[name] = build_one(name, entry, tokenizer=tokenizer, image_size=image_size,
                          world_dir=world_dir)
  return out
