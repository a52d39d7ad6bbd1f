"""The stream world: long streams of per-frame features in which events happen at known times,
with one English and one Chinese sentence query per event (temporal sentence grounding, TSGSV).

A stream is `num_frames` frames (drawn in [min_frames, max_frames]) of two or three objects of the
image world's seen classes (synthetic_world: colour × shape) on a background. Three to six events
happen one after another, each lasting `_EVENT_FRAMES` frames with gaps of at least `_GAP` frames:
an object appears, disappears, moves left / right / up / down (by `_STEP` of the frame) or turns
another colour. Each event's query names the object by its class when the event starts ("the red
circle moves left" / "红色圆形向左移动"); queries are unique within a stream (an event whose
sentence another event already has is drawn again).

Frames are features, not pixels: what a frozen frame encoder would give, in closed form. Fixed
random unit vectors (seeded by the world's seed only) for each background B[b], each class E[k]
and two position directions per shape U[s], V[s]; with visibility v_o(t) ∈ [0, 1] (ramping over
an appear or a disappear), position x_o(t), y_o(t) ∈ [0, 1] (linear over a move) and the class
embedding blended from the old to the new colour over a colour change:
  f(t) = B[bg] + Σ_o v_o(t) · (E_o(t) + 2(x_o(t) − ½) U[s_o] + 2(y_o(t) − ½) V[s_o]) + noise · ε(t)
with ε(t) ~ N(0, I / dim). A query is grounded only by telling which object did what, and when.

Everything is a pure function of (seed, split, index): stream k of a split is the same at any
count, so a bigger build extends a smaller one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from data_pipelines import synthetic_world as sw

SPLITS = ("train", "val")
DIRECTIONS = ("left", "right", "up", "down")
_VECTORS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
KINDS = ("appear", "disappear", "move", "colour")
_EVENT_FRAMES = (6, 28)       # an event's length in frames, inclusive
_GAP = (3, 24)                # frames between events
_STEP = 0.3                   # a move's travel, in fractions of the frame
_EVENTS = (3, 6)
_OBJECTS = (2, 3)
_P_HIDDEN = 0.3               # an object starts hidden (it can then appear)
_POSITION_GAIN = 2.0          # position's weight in a feature (a move changes it by 0.6)

EN = {"appear": ("the {o} appears", "the {o} shows up"),
      "disappear": ("the {o} disappears", "the {o} goes away"),
      "move": ("the {o} moves {d}", "the {o} slides {d}"),
      "colour": ("the {o} turns {c}", "the {o} becomes {c}")}
ZH = {"appear": ("{o}出现了", "出现了{o}"),
      "disappear": ("{o}消失了", "{o}不见了"),
      "move": ("{o}向{d}移动", "{o}往{d}移动了"),
      "colour": ("{o}变成了{c}", "{o}的颜色变成了{c}")}
ZH_DIRECTION = {"left": "左", "right": "右", "up": "上", "down": "下"}


@dataclasses.dataclass(frozen=True)
class Event:
  obj: int
  kind: str
  start: int                   # first frame of the change
  end: int                     # last frame of the change (inclusive)
  direction: str = ""
  from_cls: int = -1
  to_cls: int = -1


@dataclasses.dataclass(frozen=True)
class Stream:
  num_frames: int
  background: int
  classes: tuple[int, ...]     # each object's class at frame 0
  positions: tuple[tuple[float, float], ...]
  visible: tuple[bool, ...]
  events: tuple[Event, ...]


def _stream_rng(seed: int, split: str, index: int) -> np.random.Generator:
  return sw.record_rng(seed, "stream/" + split, index)


def _colour_options(cls: int) -> list[int]:
  shape = cls % sw.NUM_SHAPES
  return [k for k in sw.SEEN if k % sw.NUM_SHAPES == shape and k != cls]


def sample_stream(seed: int, split: str, index: int, min_frames: int = 128,
                  max_frames: int = 256) -> Stream:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  rng = _stream_rng(seed, split, index)
  t = int(rng.integers(min_frames, max_frames + 1))
  n_obj = int(rng.integers(_OBJECTS[0], _OBJECTS[1] + 1))
  shapes = rng.choice(sw.NUM_SHAPES, n_obj, replace=False)   # one object per shape: names differ
  classes = []
  for s in shapes:
    options = [k for k in sw.SEEN if k % sw.NUM_SHAPES == s]
    classes.append(int(options[int(rng.integers(len(options)))]))
  pos = [(float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.2, 0.8))) for _ in range(n_obj)]
  vis = [bool(rng.random() >= _P_HIDDEN) for _ in range(n_obj)]
  state_cls, state_pos, state_vis = list(classes), list(pos), list(vis)
  events: list[Event] = []
  sentences: set[str] = set()
  frame = int(rng.integers(_GAP[0], _GAP[1] + 1))
  want = int(rng.integers(_EVENTS[0], _EVENTS[1] + 1))
  tries = 0
  while len(events) < want and tries < 50:
    tries += 1
    length = int(rng.integers(_EVENT_FRAMES[0], _EVENT_FRAMES[1] + 1))
    if frame + length > t:
      break
    o = int(rng.integers(n_obj))
    if not state_vis[o]:
      ev = Event(o, "appear", frame, frame + length - 1)
    else:
      kind = str(rng.choice(["disappear", "move", "move", "colour"]))
      if kind == "move":
        x, y = state_pos[o]
        ok = [d for d in DIRECTIONS
              if 0.1 <= x + _STEP * _VECTORS[d][0] <= 0.9 and 0.1 <= y + _STEP * _VECTORS[d][1] <= 0.9]
        if not ok:
          continue
        ev = Event(o, "move", frame, frame + length - 1, direction=str(ok[int(rng.integers(len(ok)))]))
      elif kind == "colour":
        opts = _colour_options(state_cls[o])
        if not opts:
          continue
        ev = Event(o, "colour", frame, frame + length - 1, from_cls=state_cls[o],
                   to_cls=int(opts[int(rng.integers(len(opts)))]))
      else:
        ev = Event(o, "disappear", frame, frame + length - 1)
    key = _sentence(ev, state_cls[o], "en", 0)
    if key in sentences:
      continue
    sentences.add(key)
    events.append(dataclasses.replace(ev, from_cls=state_cls[o]) if ev.kind != "colour" else ev)
    if ev.kind == "appear":
      state_vis[o] = True
    elif ev.kind == "disappear":
      state_vis[o] = False
    elif ev.kind == "move":
      dx, dy = _VECTORS[ev.direction]
      state_pos[o] = (state_pos[o][0] + _STEP * dx, state_pos[o][1] + _STEP * dy)
    else:
      state_cls[o] = ev.to_cls
    frame = ev.end + 1 + int(rng.integers(_GAP[0], _GAP[1] + 1))
  return Stream(t, int(rng.integers(len(sw.BACKGROUNDS))), tuple(classes), tuple(pos),
                tuple(vis), tuple(events))


def _sentence(ev: Event, cls: int, lang: str, variant: int) -> str:
  name = sw.CLASSES[cls][lang]
  table = EN if lang == "en" else ZH
  d = ev.direction if lang == "en" else ZH_DIRECTION.get(ev.direction, "")
  c = sw.COLOURS[ev.to_cls // sw.NUM_SHAPES][lang] if ev.kind == "colour" else ""
  return table[ev.kind][variant % 2].format(o=name, d=d, c=c)


def sentences(stream: Stream, rng: np.random.Generator) -> list[dict[str, str]]:
  """Per event, its English and Chinese query (a template variant drawn per language)."""
  return [{lang: _sentence(ev, ev.from_cls, lang, int(rng.integers(2))) for lang in ("en", "zh")}
          for ev in stream.events]


def codebook(seed: int, dim: int) -> dict[str, np.ndarray]:
  """The world's fixed feature directions (unit vectors), a function of seed and dim."""
  rng = np.random.default_rng([seed, 0x5743, dim])

  def unit(*shape):
    v = rng.standard_normal(shape + (dim,))
    return v / np.linalg.norm(v, axis=-1, keepdims=True)
  return {"background": unit(len(sw.BACKGROUNDS)), "classes": unit(sw.NUM_CLASSES),
          "u": unit(sw.NUM_SHAPES), "v": unit(sw.NUM_SHAPES)}


def trajectories(stream: Stream) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Per object and frame: visibility, x and y (O, T), and the class blend (O, T, 3) as
  [from class, to class, weight of "to"] (weight 0 outside colour changes)."""
  o_n, t_n = len(stream.classes), stream.num_frames
  vis = np.zeros((o_n, t_n))
  xs, ys = np.zeros((o_n, t_n)), np.zeros((o_n, t_n))
  blend = np.zeros((o_n, t_n, 3))
  for o in range(o_n):
    v, (x, y), cls = float(stream.visible[o]), stream.positions[o], stream.classes[o]
    vis[o], xs[o], ys[o] = v, x, y
    blend[o, :, 0], blend[o, :, 1] = cls, cls
  t = np.arange(t_n)
  for ev in stream.events:
    o = ev.obj
    ramp = np.clip((t - ev.start + 1) / (ev.end - ev.start + 1), 0.0, 1.0)   # 1 at ev.end
    after = t >= ev.start
    if ev.kind in ("appear", "disappear"):
      target = ramp if ev.kind == "appear" else 1.0 - ramp
      vis[o] = np.where(after, target, vis[o])
    elif ev.kind == "move":
      dx, dy = _VECTORS[ev.direction]
      x0, y0 = xs[o, ev.start], ys[o, ev.start]
      xs[o] = np.where(after, x0 + _STEP * dx * ramp, xs[o])
      ys[o] = np.where(after, y0 + _STEP * dy * ramp, ys[o])
    else:
      blend[o, after, 0] = ev.from_cls
      blend[o, after, 1] = ev.to_cls
      blend[o, after, 2] = ramp[after]
      # after the change the object is simply of the new class
      done = t > ev.end
      blend[o, done, 0] = ev.to_cls
      blend[o, done, 2] = 0.0
  return vis, xs, ys, blend


def features(stream: Stream, book: dict[str, np.ndarray], noise: float,
             rng: np.random.Generator) -> np.ndarray:
  """The stream's (T, dim) float32 frame features (module docstring)."""
  vis, xs, ys, blend = trajectories(stream)
  dim = book["classes"].shape[-1]
  f = np.broadcast_to(book["background"][stream.background], (stream.num_frames, dim)).copy()
  for o in range(len(stream.classes)):
    shape = stream.classes[o] % sw.NUM_SHAPES
    a, b, w = blend[o, :, 0].astype(int), blend[o, :, 1].astype(int), blend[o, :, 2:3]
    emb = (1 - w) * book["classes"][a] + w * book["classes"][b]
    g = _POSITION_GAIN
    emb = (emb + g * (xs[o] - 0.5)[:, None] * book["u"][shape]
           + g * (ys[o] - 0.5)[:, None] * book["v"][shape])
    f += vis[o][:, None] * emb
  f += noise * rng.standard_normal(f.shape) / np.sqrt(dim)
  return f.astype(np.float32)


def make_stream(seed: int, split: str, index: int, *, dim: int = 64, fps: float = 2.0,
                noise: float = 0.2, min_frames: int = 128, max_frames: int = 256,
                book: dict[str, np.ndarray] | None = None) -> tuple[str, np.ndarray, dict[str, Any]]:
  """(video id, features (T, dim) float32, its annotation in ActivityNet Captions' layout plus
  "sentences_zh" and "events") of one (seed, split, index). Frame k is at k / fps seconds; the
  duration is (T − 1) / fps, so a moment's frame positions are its times × fps."""
  stream = sample_stream(seed, split, index, min_frames, max_frames)
  rng = _stream_rng(seed, split + "/text", index)
  book = codebook(seed, dim) if book is None else book
  feats = features(stream, book, noise, _stream_rng(seed, split + "/noise", index))
  texts = sentences(stream, rng)
  vid = f"stream_{split}_{index:06d}"
  ann = {"duration": (stream.num_frames - 1) / fps,
         "timestamps": [[ev.start / fps, ev.end / fps] for ev in stream.events],
         "sentences": [s["en"] for s in texts], "sentences_zh": [s["zh"] for s in texts],
         "events": [{"object": int(ev.obj), "kind": ev.kind, "direction": ev.direction,
                     "start_frame": ev.start, "end_frame": ev.end} for ev in stream.events]}
  return vid, feats, ann


def corpus(seed: int, count: int) -> list[str]:
  """Query sentences of the first `count` training streams, both languages (the tokenizer's)."""
  out = []
  for i in range(count):
    stream = sample_stream(seed, "train", i)
    for s in sentences(stream, _stream_rng(seed, "train/text", i)):
      out += [s["en"], s["zh"]]
  return out
