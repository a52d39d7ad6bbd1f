"""Temporal sentence grounding in a stream (`kind: grounding`): every frame of every query's video
is scored causally, then proposals, R@{1,5} at IoU {0.3, 0.5, 0.7} and mcAP.

Sources (`source`):
  world          the stream world's split (`split`, default "val": streams never trained on),
                 its features and both languages' queries (`langs`)
  json:PATH      an ActivityNet Captions (train.json / val_1.json) or TACoS style annotation
                 file (`bigvl.data.formats.grounding`), features from `features` (a folder of
                 {video}.npy, or "h5:FILE" / FILE.h5)
Scoring is causal, as the `StreamingGrounder`'s (the same numbers, computed in batches):
  stride = short (default, 0)  windows [kS, kS + S) (long memory: the `long` frames before
                               each), every frame scored at its place in its window; the causal
                               decoder never lets a frame see a later one
  stride = 1                   (the authors' test) frame t scored as the last of the window
                               ending at t: S times the compute, each frame with a full window

Predictor "ground": {"features" (B, long + short, D), "feature_mask", "text", "text_mask"} →
{"scores": (B, short, 3)} probabilities of the window's frames.

Metrics, for `prefix` the entry's name (metrics.py in `grounding_metrics`):
  {prefix}/r{k}_iou{m}           k ∈ {1, 5}, m ∈ {0.3, 0.5, 0.7}
  {prefix}/mcap                  mean calibrated AP of the inside score (labels: the moment's
                                 frames, widened by `mcap_extension` × its length each side)
  {prefix}/chance/r{k}_iou{m}, {prefix}/chance/mcap   the same for uniform random scores
  {prefix}/n                     queries scored
"""

from __future__ import annotations

import collections
import os
from typing import Any, Mapping, Sequence

import numpy as np

from bigvl.evaluators import common, grounding_metrics as gm

SOURCES = ("world", "json")
KS, IOUS = (1, 5), (0.3, 0.5, 0.7)


def parse_source(source: str) -> tuple[str, str]:
  if source == "world":
    return "world", ""
  kind, sep, where = source.partition(":")
  if sep and where and kind == "json":
    return kind, where
  raise ValueError(f"grounding source {source!r}: use 'world' or 'json:PATH' (ActivityNet "
                   "Captions or TACoS style)")


class _Cache:
  """The last few videos' features (rows come query by query, frame by frame)."""

  def __init__(self, store, size: int = 8):
    self.store, self.size = store, size
    self.items: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()

  def __call__(self, video: str) -> np.ndarray:
    if video in self.items:
      self.items.move_to_end(video)
      return self.items[video]
    x = self.store.load(video)
    self.items[video] = x
    if len(self.items) > self.size:
      self.items.popitem(last=False)
    return x


class GroundingEvaluator:
  requires = ("ground",)

  @classmethod
  def config_keys(cls) -> dict[str, Any]:
    return dict(
        features="",             # json sources: {video}.npy folder, "h5:FILE" or FILE.h5
        langs="en,zh",           # query languages read where the file has them
        long=0, short=0,         # memory lengths (0: the system's)
        stride=0,                # 0: the short window's (window-wise); 1: frame-wise (authors)
        top=5, nms=0.5,          # proposals kept, NMS IoU threshold
        max_points=128,          # longer score sequences are median-filtered and subsampled
        mcap_extension=0.0,      # the moment's labels widened by this × its length (authors: 1)
    )

  @classmethod
  def validate_config(cls, name: str, entry: Mapping[str, Any]) -> None:
    kind, _ = parse_source(entry.get("source", "world"))
    if kind == "json" and not entry.get("features"):
      raise ValueError(f"evals.{name}: a json source needs features (a folder of .npy or h5:FILE)")
    bad = [lg for lg in str(entry.get("langs", "en,zh")).split(",") if lg not in ("en", "zh")]
    if bad:
      raise ValueError(f"evals.{name}.langs: {bad} not in en, zh")
    if entry.get("stride", 0) not in (0, 1) and entry.get("stride") != entry.get("short"):
      raise ValueError(f"evals.{name}.stride={entry.get('stride')}: 0 (the short window's) or 1")
    if not 0 < entry.get("nms", 0.5) <= 1 or entry.get("top", 5) < 1:
      raise ValueError(f"evals.{name}: nms in (0, 1] and top >= 1")

  @classmethod
  def from_config(cls, name: str, entry: Mapping[str, Any], *, tokenizer, image_size: int = 0,
                  world_dir: str = "") -> "GroundingEvaluator":
    from bigvl.data.formats import grounding
    del image_size
    if not entry.get("long") or not entry.get("short"):
      raise ValueError(f"evals.{name}: long and short must be set (a grounding system fills "
                       "them from its config)")
    kind, where = parse_source(entry.get("source", "world"))
    langs = str(entry.get("langs", "en,zh")).split(",")
    if kind == "world":
      if not world_dir:
        raise ValueError(f"evals.{name}: source 'world' needs the stream world")
      split = entry.get("split", "val") or "val"
      path = os.path.join(world_dir, f"{split}.json")
      features = os.path.join(world_dir, "features")
    else:
      path, features = os.path.expanduser(where), entry["features"]
    queries = grounding.read_annotations(path, langs)
    if entry.get("max_examples"):
      queries = queries[:entry["max_examples"]]
    return cls(queries=queries, store=grounding.FeatureStore(features), tokenizer=tokenizer,
               long=entry["long"], short=entry["short"],
               stride=entry.get("stride", 0) or entry["short"], top=entry.get("top", 5),
               nms=entry.get("nms", 0.5), max_points=entry.get("max_points", 128),
               mcap_extension=entry.get("mcap_extension", 0.0), prefix=name,
               every=entry.get("every", 0), batch_size=entry.get("batch_size"))

  def __init__(self, *, queries: Sequence[Any], store, tokenizer, long: int, short: int,
               stride: int = 0, top: int = 5, nms: float = 0.5, max_points: int = 128,
               mcap_extension: float = 0.0, prefix: str = "grounding", every: int = 0,
               batch_size: int | None = None):
    from bigvl.data.formats import grounding
    if not queries:
      raise ValueError("grounding needs at least one query")
    self.queries, self.store, self.tokenizer = list(queries), store, tokenizer
    self.long, self.short = long, short
    self.stride = stride or short
    if self.stride not in (1, short):
      raise ValueError(f"stride={stride}: 1 or the short window ({short})")
    self.top, self.nms, self.max_points, self.ext = top, nms, max_points, mcap_extension
    self.prefix, self.every, self.batch_size = prefix, every, batch_size
    self.lengths = grounding.video_lengths(store, [q.video for q in self.queries])
    self.tokens = [tokenizer.encode(q.sentence) for q in self.queries]
    frames = np.asarray([self.lengths[q.video] for q in self.queries], np.int64)
    self.ends = np.cumsum(-(-frames // self.stride))      # windows per query

  def __len__(self) -> int:
    return len(self.queries)

  def window_start(self, k: int) -> int:
    """Start of row k's short window within its video."""
    return k * self.short if self.stride == self.short else k - self.short + 1

  def rows(self) -> common.Rows:
    """One row per (query, window): stride S, windows [kS, kS + S); stride 1, the window whose
    short part ends at frame k."""
    from bigvl.data.formats import grounding
    cache = _Cache(self.store)

    def load(idx: np.ndarray) -> dict[str, np.ndarray]:
      out = collections.defaultdict(list)
      for i in np.asarray(idx, np.int64):
        q = int(np.searchsorted(self.ends, i, side="right"))
        k = int(i - (self.ends[q - 1] if q else 0))
        block, mask = grounding.window(cache(self.queries[q].video), self.window_start(k),
                                       self.long, self.short, 0)
        out["features"].append(block)
        out["feature_mask"].append(mask)
        out["text"].append(self.tokens[q][0])
        out["text_mask"].append(self.tokens[q][1])
      return {k: np.stack(v) for k, v in out.items()}
    return common.Rows(int(self.ends[-1]), load)

  def scores(self, predictor: common.Predictor) -> list[np.ndarray]:
    """Per query, its (T, 3) start / end / inside probabilities."""
    flat = np.asarray(predictor.run("ground", self.rows(), self.batch_size)["scores"], np.float64)
    out = []
    for q, rows in zip(self.queries, np.split(flat, self.ends[:-1])):
      t = self.lengths[q.video]
      s = rows[:, -1] if self.stride == 1 else rows.reshape(-1, 3)
      out.append(s[:t])
    return out

  def metrics(self, per_query: Sequence[np.ndarray], prefix: str) -> dict[str, float]:
    props, gts, caps = [], [], []
    for q, s in zip(self.queries, per_query):
      p, _ = gm.proposals(s[:, 0], s[:, 1], q.duration, top=self.top, nms=self.nms,
                          max_points=self.max_points)
      props.append(p)
      gts.append((q.start, q.end))
      caps.append(gm.calibrated_ap(s[:, 2], gm.moment_mask((q.start, q.end), q.duration,
                                                           len(s), self.ext)))
    out = {f"{prefix}/{k}": v for k, v in gm.recall(props, gts, KS, IOUS).items()}
    out[f"{prefix}/mcap"] = float(np.mean(caps))
    return out

  def run(self, predictor: common.Predictor) -> dict[str, float]:
    out = self.metrics(self.scores(predictor), self.prefix)
    rng = np.random.default_rng(0)
    chance = [rng.random((self.lengths[q.video], 3)) for q in self.queries]
    out.update(self.metrics(chance, f"{self.prefix}/chance"))
    out[f"{self.prefix}/n"] = float(len(self.queries))
    return out
