"""Text↔video retrieval: R@1/5/10, median and mean rank both ways, with the chance level.

Similarities need not be dot products of two embeddings (DMAE compares every text token with every
frame), so the system gives three predictors: "encode_video" ({"frames", "frame_mask"} →
{"tokens": (B, T, d), ...}), "encode_text" ({"text", "text_mask"} → {"tokens": (B, L, d)}) and
"score_tiles", which scores tiles of `tile` texts × `tile` videos, many tiles per batch, each device
its own ({"t", "tw", "v", "vm"}: (k, tile, L, d), (k, tile, L), (k, tile, T, d), (k, tile, T) →
{"sim": (k, tile, tile)}). Features stay on the host between the passes; nothing needs every
text's features on one device.

Several sentences per video (MSR-VTT's 20, the world's English and Chinese captions) follow the
standard multi-sentence protocol (CLIP4Clip's for MSVD and MSR-VTT's full test): text→video ranks
every sentence as a query against all videos; video→text ranks a video by its best-ranked
sentence among all sentences. A set of one sentence per video (MSR-VTT 1k-A, JSFusion's split) is
the special case of one. Ties count against the model. Logged, for `prefix` = the entry's name:
  {prefix}/{t2v,v2t}/{r1,r5,r10,mdr,mnr}     all languages' sentences together
  {prefix}/chance/{t2v,v2t}/r1                a random ranking's expected R@1
  {prefix}/{lang}/{t2v,v2t}/...               per language, when there are several
Text weights (DMAE's textual cue) are made as in training: `text_weights` "keywords" (the keyword
tagger's) or "uniform"; a system fills an entry's "" with what it trains with.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from bigvl.evaluators import common, metrics

KS = (1, 5, 10)
TEXT_WEIGHTS = ("keywords", "uniform")


def ranks(sim: np.ndarray, text_video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(t2v, v2t) 0-based ranks of the positive for sim (n_texts, n_videos), text_video[i] = text
  i's video: t2v per text; v2t per video, its best-ranked sentence."""
  sim = np.asarray(sim, np.float64)
  metrics.check_finite(sim, "text-video similarity")
  n_txt, n_vid = sim.shape
  text_video = np.asarray(text_video, np.int64)
  if text_video.shape != (n_txt,) or (n_txt and (text_video.min() < 0 or
                                                 text_video.max() >= n_vid)):
    raise ValueError(f"text_video must name one of {n_vid} videos for each of {n_txt} texts")
  if not np.isin(np.arange(n_vid), text_video).all():
    raise ValueError("every video needs at least one sentence")
  pos = sim[np.arange(n_txt), text_video]
  t2v = (sim >= pos[:, None]).sum(axis=1) - 1
  best = np.full(n_vid, -np.inf)
  np.maximum.at(best, text_video, pos)
  v2t = (sim >= best[None, :]).sum(axis=0) - np.bincount(
      text_video, weights=pos >= best[text_video], minlength=n_vid).astype(np.int64)
  return t2v, v2t


def rank_metrics(rank: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
  out = {f"r{k}": float(np.mean(rank < k)) for k in ks}
  out["mdr"] = float(np.median(rank + 1))
  out["mnr"] = float(np.mean(rank + 1))
  return out


def chance_r1(n_videos: int, text_video: np.ndarray) -> dict[str, float]:
  """A random ranking's expected R@1: t2v 1 / videos; v2t a video's sentences / all sentences."""
  per_video = np.bincount(text_video, minlength=n_videos)
  return {"t2v/r1": 1.0 / n_videos, "v2t/r1": float(np.mean(per_video / len(text_video)))}


def make_text_weights(kind: str) -> Callable[[Any, str], tuple[np.ndarray, np.ndarray,
                                                               np.ndarray]]:
  """(tokenizer, text) → (ids, mask, weights) as training makes them (without word dropping)."""
  from bigvl.data import keywords
  from bigvl.data.formats import video_text
  tagger = keywords.default_tagger() if kind == "keywords" else None
  return lambda tokenizer, text: video_text.text_weights(tokenizer, text, tagger)


class VideoRetrievalEvaluator:
  requires = ("encode_video", "encode_text", "score_tiles")

  @classmethod
  def config_keys(cls) -> dict[str, Any]:
    return dict(
        num_frames=0,            # frames per video (0: the system's data.num_frames)
        text_weights="",         # "keywords" | "uniform" ("": what the system trains with)
        video_dir="",            # msrvtt: the folder of {video_id}.mp4 ("": beside the JSON)
        tile=64,                 # texts and videos per scored tile
    )

  @classmethod
  def validate_config(cls, name: str, entry: Mapping[str, Any]) -> None:
    weights = entry.get("text_weights", "")
    if weights and weights not in TEXT_WEIGHTS:
      raise ValueError(f"evals.{name}.text_weights={weights!r}: use one of {list(TEXT_WEIGHTS)}")
    if entry.get("num_frames", 0) < 0 or entry.get("tile", 64) < 1:
      raise ValueError(f"evals.{name}: num_frames must be >= 0 and tile >= 1")

  @classmethod
  def from_config(cls, name: str, entry: Mapping[str, Any], *, tokenizer, image_size: int,
                  world_dir: str = "") -> "VideoRetrievalEvaluator":
    from bigvl.evaluators import video_sources
    if not entry.get("num_frames") or not entry.get("text_weights"):
      raise ValueError(f"evals.{name}: num_frames and text_weights must be set (a video system "
                       "fills them from its config)")
    data = video_sources.open_video_source(
        entry["source"], num_frames=entry["num_frames"], frame_size=image_size,
        split=entry.get("split", "eval"), world_dir=world_dir,
        video_dir=entry.get("video_dir", ""), max_examples=entry.get("max_examples", 0))
    return cls(videos=data.videos, captions=data.captions, tokenizer=tokenizer,
               text_weights=make_text_weights(entry["text_weights"]), prefix=name,
               every=entry.get("every", 0), batch_size=entry.get("batch_size"),
               tile=entry.get("tile", 64))

  def __init__(self, *, videos: common.Rows, captions: Sequence[Sequence[tuple[str, str]]],
               tokenizer, text_weights, prefix: str = "video_retrieval", every: int = 0,
               batch_size: int | None = None, tile: int = 64):
    if len(captions) != len(videos):
      raise ValueError(f"{len(captions)} caption lists for {len(videos)} videos")
    if not all(captions):
      raise ValueError("video retrieval needs at least one sentence per video")
    self.videos, self.images = videos, videos   # `images`: what build_one logs the size of
    self.captions = [list(c) for c in captions]
    self.tokenizer, self.text_weights = tokenizer, text_weights
    self.prefix, self.every, self.batch_size, self.tile = prefix, every, batch_size, tile

  def _texts(self, langs: Sequence[str] | None):
    texts, owner = [], []
    for v, caps in enumerate(self.captions):
      for lang, text in caps:
        if langs is None or lang in langs:
          texts.append(text)
          owner.append(v)
    return texts, np.asarray(owner, np.int64)

  def similarity(self, predictor: common.Predictor, t: np.ndarray, tw: np.ndarray,
                 v: np.ndarray, vm: np.ndarray) -> np.ndarray:
    """(texts, videos) similarity, scored tile by tile by "score_tiles"."""
    n_t, n_v, s = len(t), len(v), self.tile
    pad = lambda x, n: np.concatenate([x, np.zeros((n - len(x),) + x.shape[1:], x.dtype)])
    gt, gv = math.ceil(n_t / s), math.ceil(n_v / s)
    t, tw = pad(t, gt * s), pad(tw, gt * s)
    v, vm = pad(v, gv * s), pad(vm, gv * s)
    vm[n_v:, 0] = 1   # a padding video keeps one frame: every max stays finite

    def load(idx):
      i, j = idx // gv, idx % gv
      rows = lambda x, k: np.stack([x[a * s:(a + 1) * s] for a in k])
      return {"t": rows(t, i), "tw": rows(tw, i), "v": rows(v, j), "vm": rows(vm, j)}
    per_batch = max(1, (self.batch_size or 256) // s)
    sim = predictor.run("score_tiles", common.Rows(gt * gv, load), per_batch)["sim"]
    sim = sim.reshape(gt, gv, s, s).transpose(0, 2, 1, 3).reshape(gt * s, gv * s)
    return sim[:n_t, :n_v]

  def run(self, predictor: common.Predictor) -> dict[str, float]:
    out_v = predictor.run("encode_video", self.videos, self.batch_size)
    v, vm = out_v["tokens"], out_v["frame_mask"]
    texts, owner = self._texts(None)
    enc = [self.text_weights(self.tokenizer, x) for x in texts]
    ids, mask, weight = (np.stack(a) for a in zip(*enc))
    t = predictor.run("encode_text", common.Rows.of(text=ids, text_mask=mask),
                      self.batch_size)["tokens"]
    sim = self.similarity(predictor, t, weight.astype(np.float32), v, vm.astype(np.int32))
    langs = sorted({lang for caps in self.captions for lang, _ in caps})
    out = {}
    groups = {None: None} | ({lang: [lang] for lang in langs} if len(langs) > 1 else {})
    for group, members in groups.items():
      keep = np.ones(len(texts), bool) if members is None else np.asarray(
          [lang in members for caps in self.captions for lang, _ in caps])
      present = np.unique(owner[keep])   # the videos with a sentence in the group
      sub = sim[keep][:, present]
      o = np.searchsorted(present, owner[keep])
      t2v, v2t = ranks(sub, o)
      name = self.prefix if group is None else f"{self.prefix}/{group}"
      for direction, rank in (("t2v", t2v), ("v2t", v2t)):
        for k, val in rank_metrics(rank).items():
          out[f"{name}/{direction}/{k}"] = val
      if group is None:
        for k, val in chance_r1(len(present), o).items():
          out[f"{name}/chance/{k}"] = val
    return out
