"""Temporal sentence grounding on per-frame features: annotations, feature stores, the streaming
windows training reads and the rows evaluation reads.

Annotations (`read_annotations`), one JSON object per split, keyed by video:
  ActivityNet Captions   {"duration": s, "timestamps": [[start, end], ...] seconds,
                          "sentences": [...]}   (train.json, val_1.json, val_2.json)
  TACoS (2D-TAN's)       {"num_frames": n, "fps": f, "timestamps": [[start, end], ...] frames,
                          "sentences": [...]}   (times = frames / fps)
  optional "sentences_zh": the same queries in Chinese (the stream world writes it).
A query whose moment is empty or outside the video, or a video whose lists differ in length, is
an error naming the file and video.

Features (`FeatureStore`): a folder of {video}.npy files (T, D), or an HDF5 file ("h5:PATH", or a
path ending .h5 / .hdf5) whose entry per video is a dataset (MAD's CLIP features) or a group holding
one (ActivityNet's C3D: {video}/c3d_features). Frame t of T spans the video evenly: a moment's
frame positions are s = start / duration · (T − 1), e likewise (`losses.grounding`).

Streaming windows (TSGSV): for a short window starting at frame st, the model reads
  long memory   frames [st − M, st)          (M = 64)
  short window  frames [st, st + S)          (S = 8)   the frames it scores
  future memory frames [st + S, st + S + F)  (F = 64, training only: TwinNet)
as one block of M + S + F frames; frames outside the video are zeros with mask 0. Training cuts
each query's video into non-overlapping short windows st = o − S + 1 + S·k with a phase o drawn
anew every epoch (the stream's per-position `draw`), k = 0 … ⌊(T − 1) / S⌋ (the authors'); a
window past the end is moved back to end at the last frame. Evaluation scores every frame t with
the window whose short part ends at t (stride 1) and keeps the last frame's scores: exactly what
`StreamingGrounder` computes frame by frame.

Training batches:
  features float32 (M + S + F, D), feature_mask int32 (M + S + F,)
  labels float32 (S, 3) Gaussian start / end / inside, label_mask int32 (S,)
  text, text_mask int32 (L,), id int64
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from bigvl.data import stream
from bigvl.losses import grounding as grounding_loss

BAD_RECORD, BAD_FEATURES = stream.BAD_RECORD, "bad_features"
REASONS = (BAD_RECORD, BAD_FEATURES)
KEYS = ("features", "feature_mask", "labels", "label_mask", "text", "text_mask", "id")
LANGS = ("en", "zh")
_LANG_KEY = {"en": "sentences", "zh": "sentences_zh"}


@dataclasses.dataclass(frozen=True)
class Query:
  video: str
  duration: float          # seconds
  start: float             # seconds
  end: float
  sentence: str
  lang: str


def read_annotations(path: str, langs: Sequence[str] = ("en",)) -> list[Query]:
  """The queries of an ActivityNet Captions or TACoS style JSON (module docstring), in file
  order, each language in `langs` the video has."""
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  if not isinstance(data, dict) or not data:
    raise ValueError(f"{path}: expected a non-empty JSON object keyed by video")
  out: list[Query] = []
  for vid, ann in data.items():
    where = f"{path}: video {vid!r}"
    if not isinstance(ann, dict) or not isinstance(ann.get("timestamps"), list):
      raise ValueError(f"{where}: needs 'timestamps' and 'sentences' lists")
    if "duration" in ann:
      duration, scale = float(ann["duration"]), 1.0
    elif "num_frames" in ann and "fps" in ann:
      fps = float(ann["fps"])
      if fps <= 0:
        raise ValueError(f"{where}: fps {fps} must be > 0")
      duration, scale = float(ann["num_frames"]) / fps, 1.0 / fps
    else:
      raise ValueError(f"{where}: needs 'duration' (seconds) or 'num_frames' and 'fps'")
    if duration <= 0:
      raise ValueError(f"{where}: duration {duration} must be > 0")
    for lang in langs:
      sentences = ann.get(_LANG_KEY[lang])
      if sentences is None:
        continue
      if not isinstance(sentences, list) or len(sentences) != len(ann["timestamps"]):
        raise ValueError(f"{where}: {len(ann['timestamps'])} timestamps but "
                         f"{_LANG_KEY[lang]} is not a list of as many")
      for k, (ts, sentence) in enumerate(zip(ann["timestamps"], sentences)):
        if (not isinstance(ts, (list, tuple)) or len(ts) != 2
            or not all(isinstance(x, (int, float)) for x in ts)):
          raise ValueError(f"{where}: timestamp {k} is not [start, end]")
        s, e = float(ts[0]) * scale, float(ts[1]) * scale
        if not (0 <= s < e) or s >= duration:
          raise ValueError(f"{where}: moment {k} [{s}, {e}] is empty or outside the video "
                           f"(duration {duration})")
        if not isinstance(sentence, str) or not sentence.strip():
          raise ValueError(f"{where}: sentence {k} is empty")
        out.append(Query(vid, duration, s, min(e, duration), sentence.strip(), lang))
  if not out:
    raise ValueError(f"{path}: no query in languages {list(langs)}")
  return out


class FeatureStore:
  """Per-video frame features by name: a folder of .npy files or an HDF5 file (module docstring).
  Picklable (files are opened lazily in each process)."""

  def __init__(self, spec: str):
    spec = os.path.expanduser(spec)
    if spec.startswith("h5:"):
      self.kind, self.path = "h5", spec[3:]
    elif spec.endswith((".h5", ".hdf5")):
      self.kind, self.path = "h5", spec
    else:
      self.kind, self.path = "npy", spec
    if not os.path.exists(self.path):
      raise FileNotFoundError(f"features {spec!r}: no such {'file' if self.kind == 'h5' else 'folder'}")
    self._h5 = None

  def __getstate__(self):
    return {"kind": self.kind, "path": self.path, "_h5": None}

  def _file(self):
    if self._h5 is None:
      import h5py
      self._h5 = h5py.File(self.path, "r")
    return self._h5

  def array(self, video: str):
    """The video's (T, D) float array, not read yet (a memory map or an HDF5 dataset): slicing
    it reads only those frames."""
    x = self._open(video)
    if len(x.shape) != 2 or x.shape[0] < 1 or not np.issubdtype(x.dtype, np.floating):
      raise ValueError(f"features of {video!r}: shape {x.shape} dtype {x.dtype}, expected "
                       "(frames, dim) floats")
    return x

  def _open(self, video: str):
    if self.kind == "npy":
      path = os.path.join(self.path, f"{video}.npy")
      try:
        return np.load(path, mmap_mode="r")
      except (OSError, ValueError) as e:
        raise ValueError(f"features of {video!r}: cannot read {path}: {e}") from None
    f = self._file()
    if video not in f:
      raise ValueError(f"features of {video!r}: not in {self.path}")
    x = f[video]
    if not hasattr(x, "shape"):          # a group: its one dataset
      names = list(x.keys())
      if len(names) != 1:
        raise ValueError(f"features of {video!r}: group in {self.path} holds {names}, "
                         "expected one dataset")
      x = x[names[0]]
    return x

  def load(self, video: str) -> np.ndarray:
    """(T, D) float32; a missing or malformed entry raises ValueError naming it."""
    x = np.asarray(self.array(video)[()], np.float32)
    if not np.isfinite(x).all():
      raise ValueError(f"features of {video!r}: not finite")
    return x

  def length(self, video: str) -> int:
    """Frames of `video`, from the array's header (no data read)."""
    return int(self.array(video).shape[0])

  def dim(self, video: str | None = None) -> int:
    """The features' width: of `video`, or of the store's first entry."""
    if video is None:
      if self.kind == "npy":
        names = sorted(f for f in os.listdir(self.path) if f.endswith(".npy"))
        if not names:
          raise ValueError(f"features {self.path!r}: no .npy file")
        video = names[0][:-4]
      else:
        keys = list(self._file().keys())
        if not keys:
          raise ValueError(f"features {self.path!r}: empty HDF5 file")
        video = keys[0]
    return int(self.load(video).shape[1])


def window(feats, st: int, long: int, short: int, future: int) -> tuple[np.ndarray, np.ndarray]:
  """Frames [st − long, st + short + future) of feats (T, D) — an array, or a store's unread
  `array` of which only these frames are read — zero-padded → (block, mask)."""
  t, d = feats.shape
  lo, n = st - long, long + short + future
  block = np.zeros((n, d), np.float32)
  mask = np.zeros((n,), np.int32)
  a, b = max(lo, 0), min(lo + n, t)
  if b > a:
    block[a - lo:b - lo] = feats[a:b]
    mask[a - lo:b - lo] = 1
  return block, mask


def windows_per_query(num_frames: int, short: int) -> int:
  return (num_frames - 1) // short + 1


def window_start(k: int, phase: int, num_frames: int, short: int) -> int:
  """Start of short window k at `phase` ∈ [0, short), moved back to end at the last frame."""
  return min(phase - short + 1 + short * k, num_frames - short)


class WindowSource:
  """Random-access training records: one per (query, window k) (module docstring); a record's
  bytes are its (query, k) as JSON."""

  def __init__(self, queries: Sequence[Query], lengths: Mapping[str, int], short: int):
    counts = np.asarray([windows_per_query(lengths[q.video], short) for q in queries], np.int64)
    self.ends = np.cumsum(counts)

  def __len__(self) -> int:
    return int(self.ends[-1]) if len(self.ends) else 0

  def __getitem__(self, index: int) -> bytes:
    q = int(np.searchsorted(self.ends, int(index), side="right"))
    k = int(index) - (int(self.ends[q - 1]) if q else 0)
    return json.dumps([q, k]).encode()


def query_labels(q: Query, num_frames: int, positions: np.ndarray) -> np.ndarray:
  s, e = grounding_loss.moment_frames(q.start, q.end, q.duration, num_frames)
  return grounding_loss.gaussian_labels(s, e, positions)


class _Parse:
  def __init__(self, queries, store, tokenizer, long, short, future):
    self.queries, self.store, self.tokenizer = queries, store, tokenizer
    self.long, self.short, self.future = long, short, future

  def __call__(self, raw: bytes, draw: int | None = None) -> dict[str, Any]:
    try:
      qi, k = json.loads(raw)
      q = self.queries[qi]
    except (ValueError, TypeError, IndexError) as e:
      raise stream.RecordFailure(BAD_RECORD, e) from e
    phase = int(np.random.default_rng(draw or 0).integers(self.short)) if draw is not None else 0
    try:
      feats = self.store.array(q.video)
      t = feats.shape[0]
      st = window_start(k, phase, t, self.short)
      block, mask = window(feats, st, self.long, self.short, self.future)
      if not np.isfinite(block).all():
        raise ValueError(f"features of {q.video!r}: not finite")
    except ValueError as e:
      raise stream.RecordFailure(BAD_FEATURES, e) from e
    positions = np.arange(st, st + self.short)
    ids, tmask = self.tokenizer.encode(q.sentence)
    return {"features": block, "feature_mask": mask,
            "labels": query_labels(q, t, positions),
            "label_mask": ((positions >= 0) & (positions < t)).astype(np.int32),
            "text": ids, "text_mask": tmask, "id": np.int64(qi * 100_000 + k)}


def _collate(examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in KEYS}


def video_lengths(store: FeatureStore, videos: Sequence[str]) -> dict[str, int]:
  """Frames per video (each array's header only)."""
  return {v: store.length(v) for v in dict.fromkeys(videos)}


def train_dataset(queries: Sequence[Query], store: FeatureStore, *, tokenizer, batch_size: int,
                  seed: int, long: int = 64, short: int = 8, future: int = 64, block: int = 0,
                  blocks: int = 1, worker_count: int = 0, max_skip_fraction: float = 0.05,
                  lengths: Mapping[str, int] | None = None):
  lengths = lengths or video_lengths(store, [q.video for q in queries])
  source = WindowSource(queries, lengths, short)
  parse = _Parse(list(queries), store, tokenizer, long, short, future)
  return stream.train_stream(source, parse=parse, collate=_collate, reasons=REASONS,
                             batch_size=batch_size, seed=seed, block=block, blocks=blocks,
                             worker_count=worker_count, max_skip_fraction=max_skip_fraction)
