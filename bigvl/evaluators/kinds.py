"""The table of evaluator kinds, and the keys of one entry of `config.evals`.

  evals.zeroshot   = eval_config(kind="zeroshot", source="world", split="eval_heldout")
  evals.imagenet   = eval_config(kind="zeroshot", source="tfds:imagenet2012", split="validation",
                                 data_dir="gs://BUCKET/tfds", classnames="en:imagenet_en.txt")
  evals.f30k_cn    = eval_config(kind="retrieval", source="jsonl:/data/f30k-cn_test.jsonl")

An entry holds the COMMON keys and those of its kind (`entry_keys`). Each kind is a class that
declares `config_keys()` (its keys beyond the common ones, with their defaults), `requires` (the
names of the system predictors it runs), `validate_config(name, entry)` (its own one-line checks)
and `from_config(name, entry, *, tokenizer, image_size, world_dir)` (the evaluator of an entry).
This module reads no data: config validation imports it.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Mapping, Protocol

import ml_collections

from bigvl.evaluators.captioning import CaptioningEvaluator
from bigvl.evaluators.grounding import GroundingEvaluator
from bigvl.evaluators.matching import MatchingEvaluator
from bigvl.evaluators.masked_modelling import PatchSelectionEvaluator, TGMIMEvaluator
from bigvl.evaluators.multilabel import MultiLabelEvaluator
from bigvl.evaluators.referring import ReferringEvaluator
from bigvl.evaluators.retrieval import RetrievalEvaluator
from bigvl.evaluators.video_qa import VideoQAEvaluator
from bigvl.evaluators.video_retrieval import VideoRetrievalEvaluator
from bigvl.evaluators.vqa import VQAEvaluator
from bigvl.evaluators.zeroshot import ZeroShotEvaluator


class Kind(Protocol):
  """What a class of KINDS declares; its instances are `common.Evaluator`s."""
  requires: tuple[str, ...]

  @classmethod
  def config_keys(cls) -> dict[str, Any]: ...

  @classmethod
  def validate_config(cls, name: str, entry: Mapping[str, Any]) -> None: ...

  @classmethod
  def from_config(cls, name: str, entry: Mapping[str, Any], *, tokenizer, image_size: int,
                  world_dir: str): ...


KINDS: dict[str, type] = {
    "zeroshot": ZeroShotEvaluator,
    "retrieval": RetrievalEvaluator,
    "captioning": CaptioningEvaluator,
    "tgmim": TGMIMEvaluator,
    "attn_mask": PatchSelectionEvaluator,
    "multilabel": MultiLabelEvaluator,
    "vqa": VQAEvaluator,
    "referring": ReferringEvaluator,
    "itm": MatchingEvaluator,
    "video_retrieval": VideoRetrievalEvaluator,
    "video_qa": VideoQAEvaluator,
    "grounding": GroundingEvaluator,
}

# The keys of every entry, whatever its kind.
COMMON: dict[str, Any] = dict(
    kind="",                    # one of KINDS ("": from the entry's name)
    every=0,                    # steps between runs during training (0: only at the end)
    batch_size=256,             # global, over all processes (rounded up to the device count)
    source="world",             # "world" | "tfds:NAME" | "jsonl:PATH" | "coco:PATH" (captions_*.json,
                                # captioning) | "" (off)
    split="eval_heldout",       # the world's split, or the TFDS split ("validation", "test")
    data_dir="",                # TFDS data_dir (local or gs://); jsonl: image root ("": its folder)
    max_examples=0,             # only the first N images (0: all)
)


def _kind_keys(kind: str) -> dict[str, Any]:
  """The keys of `kind` beyond COMMON; for "" (a kind given by the entry's name) those of every
  kind."""
  if kind:
    return dict(KINDS[kind].config_keys())
  out: dict[str, Any] = {}
  for cls in KINDS.values():
    out.update(cls.config_keys())
  return out


def _check_kind(kind: str) -> None:
  if kind and kind not in KINDS:
    raise ValueError(f"kind={kind!r}: {_kind_advice()}")


def _kind_advice() -> str:
  names = list(KINDS)
  quoted = [repr(k) for k in names]
  either = " or ".join([", ".join(quoted[:-1]), quoted[-1]] if len(quoted) > 1 else quoted)
  return (f"set kind={either} (or start the entry's name with {' / '.join(names)})")


def entry_keys(kind: str) -> list[str]:
  """The keys of an entry of `kind` ("": of an entry whose name gives its kind, every kind's)."""
  _check_kind(kind)
  return [*COMMON, *(k for k in _kind_keys(kind) if k not in COMMON)]


def eval_config(**overrides) -> ml_collections.ConfigDict:
  """One entry of `config.evals`: COMMON and the keys of its kind, with `overrides`. Without a
  kind the entry holds every kind's keys (its kind then comes from its name)."""
  kind = overrides.get("kind", "")
  _check_kind(kind)
  keys = COMMON | _kind_keys(kind)
  unknown = sorted(set(overrides) - set(keys))
  if unknown:
    raise ValueError(f"eval_config: no key {unknown} for kind {kind or 'any'!r} (its keys: "
                     f"{entry_keys(kind)})")
  c = ml_collections.ConfigDict(keys)
  c.update(overrides)
  return c


def kind_of(name: str, entry: Mapping[str, Any]) -> str:
  """The entry's kind: its `kind`, else from its name (zeroshot*, retrieval*, the longest kind the
  name starts with)."""
  kind = entry.get("kind", "") or next(
      (k for k in sorted(KINDS, key=len, reverse=True) if name.startswith(k)), "")
  if kind not in KINDS:
    raise ValueError((f"kind={kind!r}: " if kind else "") + _kind_advice())
  return kind


def parse_source(source: str) -> tuple[str, str]:
  """"world" → ("world", ""); "tfds:NAME" → ("tfds", NAME); "jsonl:PATH" → ("jsonl", PATH)."""
  if source == "world":
    return "world", ""
  kind, sep, where = source.partition(":")
  if sep and kind in SOURCE_KINDS and where:
    return kind, where
  raise ValueError(f"source={source!r}: use 'world', 'tfds:NAME' (e.g. tfds:imagenet2012), "
                   "'jsonl:PATH' (one {\"image\": …, \"caption\": [...]} per line), 'coco:PATH' "
                   "(a COCO captions_*.json, or instances_*.json for multilabel), or for the kinds "
                   "that read them 'voc2007:DIR', 'nuswide:DIR', 'labels:FILE', 'vqa:QUESTIONS_JSON', "
                   "'refcoco:REFS', 'msrvtt:VIDEODATAINFO_JSON', 'shards:GLOB' (video records), "
                   "'msrvtt_qa:JSON', 'msrvtt_mc:JSON' (video QA), 'json:PATH' (grounding: ActivityNet "
                   "Captions or TACoS annotations)")


# The prefixes of a source; which kinds read which is each kind's own check.
SOURCE_KINDS = ("tfds", "jsonl", "coco", "voc2007", "nuswide", "labels", "vqa", "refcoco",
                "msrvtt", "shards", "msrvtt_qa", "msrvtt_mc", "json")


def _check_keys(name: str, entry: Mapping[str, Any], kind: str) -> None:
  """A key of no kind is an error; so is a key of another kind than the entry's, unless it holds
  that kind's default (an entry made by eval_config() holds every kind's keys)."""
  own = set(entry_keys(kind))
  every = COMMON | _kind_keys("")
  for key in entry.keys():
    if key in own:
      continue
    where = f"evals.{name}.{key}"
    if key not in every:
      known = [f"evals.{name}.{k}" for k in own]
      close = difflib.get_close_matches(where, known, n=1)
      raise ValueError(f"unknown config key {where!r}" +
                       (f" (did you mean {close[0]!r}?)" if close else "") + ": fix or remove it")
    if entry[key] != every[key]:
      owners = [k for k, cls in KINDS.items() if key in cls.config_keys()]
      raise ValueError(f"{where}={entry[key]!r}: a key of kind {' / '.join(owners)}, not of "
                       f"{kind!r}: fix or remove it")


def validate_entry(name: str, entry: Mapping[str, Any], *, has_world: bool,
                   check_paths: bool = True) -> None:
  """The checks of entry `name` that need no data; each failure a one-line ValueError.
  `has_world`: the run has an embedded world (data.kind='synthetic_world'); `check_paths=False`
  skips the existence of a jsonl: source's file (planning on a machine without the data)."""
  try:
    kind = kind_of(name, entry)
  except ValueError as e:
    if entry.get("source", "world"):
      raise ValueError(f"evals.{name}: {e}") from None
    kind = ""  # an entry that is off needs no kind; its keys are checked against every kind's
  _check_keys(name, entry, kind)

  def need(cond: bool, msg: str):
    if not cond:
      raise ValueError(msg)
  every, batch_size, source, limit = (entry.get(k, COMMON[k]) for k in
                                      ("every", "batch_size", "source", "max_examples"))
  need(every >= 0, f"evals.{name}.every={every}: must be >= 0")
  need(batch_size > 0, f"evals.{name}.batch_size={batch_size}: must be positive")
  if not source:
    return  # off
  try:
    where_kind, where = parse_source(source)
  except ValueError as e:
    raise ValueError(f"evals.{name}: {e}") from None
  need(where_kind != "world" or has_world,
       f"evals.{name}.source='world' needs data.kind='synthetic_world': give it a tfds: or jsonl: "
       "source, or set source='' to turn it off")
  need(where_kind not in ("jsonl", "coco", "labels", "vqa", "refcoco", "msrvtt", "msrvtt_qa",
                          "msrvtt_mc", "json") or not check_paths
       or os.path.isfile(where), f"evals.{name}.source={source!r}: no such file")
  need(where_kind not in ("voc2007", "nuswide") or not check_paths or os.path.isdir(where),
       f"evals.{name}.source={source!r}: no such directory")
  need(limit >= 0, f"evals.{name}.max_examples={limit}: must be >= 0")
  KINDS[kind].validate_config(name, entry)


def validate_entries(evals: Mapping[str, Mapping[str, Any]], *, has_world: bool,
                     check_paths: bool = True) -> None:
  """`validate_entry` of every entry of a config's evals (the first failure raised)."""
  for name, entry in evals.items():
    validate_entry(name, entry, has_world=has_world, check_paths=check_paths)
