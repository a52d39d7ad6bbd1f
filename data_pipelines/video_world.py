"""The video world: short clips of image-world objects that appear, disappear, move or change
colour, captioned in English and Chinese, with questions about what happens.

A clip is `num_frames` frames (frame k at time k / fps) of one to three objects of the image world
(its colours, outlines, polygons and backgrounds, from synthetic_world) on a static background.
One or two events happen in it; with two, the first lies in the first half of the frames and the
second in the second half, on two objects or on one (moves and colour changes only). An optional
third object stands still throughout. Objects are the image world's seen classes only, so that
its held-out classes stay unseen by a model trained on both worlds; what the video world holds out
is temporal composition:
- (shape, action) pairs: one shape per action, closed under time reversal (`HELD_OUT_SHAPE`): a
  triangle never appears or disappears in training, a circle never moves left or right, a cross
  never up or down, a square never changes colour. Every shape still does the other actions and
  every action is still done by three shapes.
- event orders of two-event clips (`HELD_OUT_ORDERS`): "appear then move", "move then disappear",
  "colour change then appear", "disappear then colour change" never occur in training, while
  their reverses do ("move then appear", ...). The set is closed under time reversal too.
Training clips hold neither; every "eval" clip holds at least one; "eval_seen" clips hold neither
(new clips of seen compositions). Evaluation clips come in time-mirrored pairs: clip 2k+1 is clip
2k played backwards (the same objects and background, frames in reverse order, pixel-identical),
with the mirrored captions (left <-> right, up <-> down, appear <-> disappear, c1 -> c2 <-> c2 ->
c1, "A, then B" <-> "B', then A'"), so that one frame cannot tell a caption from its mirror.

Everything is a pure function of (seed, split, index), as in the image world: geometry lives in
fractions of the frame, so a clip is the same scene at any frame size.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines import synthetic_world as sw

SPLITS = ("train", "eval", "eval_seen")
# Ids are unique across worlds and splits (the image world uses 0-3e9, the scene world 3e9-6e9).
SPLIT_ID_OFFSET = {"train": 6_000_000_000, "eval": 7_000_000_000, "eval_seen": 8_000_000_000}
MIRRORED_SPLITS = ("eval", "eval_seen")

KINDS = ("appear", "disappear", "move", "colour")
DIRECTIONS = ("left", "right", "up", "down")
ACTIONS = ("appear", "disappear", "move_left", "move_right", "move_up", "move_down", "colour")
_VECTORS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
MIRROR_KIND = {"appear": "disappear", "disappear": "appear", "move": "move", "colour": "colour"}
MIRROR_ACTION = {"appear": "disappear", "disappear": "appear", "move_left": "move_right",
                 "move_right": "move_left", "move_up": "move_down", "move_down": "move_up",
                 "colour": "colour"}

# The shape each action is never done by in training (indices into sw.SHAPES); equal on an
# action and its mirror, so that a mirrored held-out clip is held out too.
HELD_OUT_SHAPE = {"appear": 2, "disappear": 2, "move_left": 0, "move_right": 0,
                  "move_up": 3, "move_down": 3, "colour": 1}
ALL_ORDERS = tuple((a, b) for a in KINDS for b in KINDS)
# (first kind, second kind); the mirror of (a, b) is (mirror b, mirror a), and the set holds it.
HELD_OUT_ORDERS = (("appear", "move"), ("move", "disappear"),
                   ("colour", "appear"), ("disappear", "colour"))
SEEN_ORDERS = tuple(o for o in ALL_ORDERS if o not in HELD_OUT_ORDERS)

SCENE_ACTIVITIES = ("motion", "appearance", "colour change", "mixed")
_ACTIVITY = {"move": "motion", "appear": "appearance", "disappear": "appearance",
             "colour": "colour change"}

# Object radius and travel, in fractions of the frame's side; margins keep objects inside the
# frame and apart from each other at every frame.
_RADIUS = (0.16, 0.20)
_DISTANCE = (0.42, 0.52)
_MARGIN, _GAP = 0.03, 0.04
_P_TWO_EVENTS = 0.6
_P_SAME_OBJECT = 0.3   # two events (moves or colour changes) on one object
_P_DISTRACTOR = 0.5
_P_MENTION_STATIC = 0.3
_P_CHINESE = 0.5
NUM_CAPTIONS = 2       # per language and clip
MIN_FRAMES, MIN_FRAMES_TWO_EVENTS = 4, 6

# --------------------------------------------------------------------------- #
# Caption and question material
# --------------------------------------------------------------------------- #

# "{a}": a noun phrase ("a red circle"); "{s}": a noun phrase or a pronoun ("it"). Phrase k of
# "appear" mirrors phrase k of "disappear", so mirrored captions keep their wording.
EN_EVENT = {
    "appear": ("{a} appears", "{a} shows up"),
    "disappear": ("{a} disappears", "{a} goes away"),
    "move": ("{s} moves {dir}", "{s} slides {dir}"),
    "colour": ("{s} turns {to}", "{s} becomes {to}"),
}
ZH_EVENT = {
    "appear": ("出现了{a}", "{a}出现了"),
    "disappear": ("{a}消失了", "{a}不见了"),
    "move": ("{s}向{dir}移动", "{s}往{dir}移动了"),
    "colour": ("{s}变成了{to}", "{s}的颜色变成了{to}"),
}
CONNECTIVES = {"en": ("{0}, then {1}", "first {0}, then {1}", "{0}, and then {1}"),
               "zh": ("{0}，然后{1}", "先是{0}，然后{1}", "{0}，接着{1}")}
FRAMES = {"en": ("{0}", "in the video, {0}"), "zh": ("{0}", "视频中{0}")}
STATIC = {"en": (", while {a} stays still", ", and {a} does not move"),
          "zh": ("，旁边的{o}一直不动", "，{o}没有移动")}
_PRONOUN = {"en": "it", "zh": "它"}
_DIRECTION_WORDS = {"en": {d: d for d in DIRECTIONS},
                    "zh": {"left": "左", "right": "右", "up": "上", "down": "下"}}

ACTION_TEXT = {
    "en": {"appear": "appears", "disappear": "disappears", "move_left": "moves left",
           "move_right": "moves right", "move_up": "moves up", "move_down": "moves down",
           "colour": "changes colour"},
    "zh": {"appear": "出现", "disappear": "消失", "move_left": "向左移动", "move_right": "向右移动",
           "move_up": "向上移动", "move_down": "向下移动", "colour": "改变颜色"},
}
YES_NO = {"en": ("yes", "no"), "zh": ("有", "没有")}
QUESTION_TYPES = ("action", "direction", "colour_to", "presence", "order")
QUESTIONS = {
    "action": {"en": "what does the {o} do?", "zh": "{o}做了什么？"},
    "direction": {"en": "which way does the {o} move?", "zh": "{o}往哪个方向移动？"},
    "colour_to": {"en": "what colour does the {o} become?", "zh": "{o}变成了什么颜色？"},
    "presence_start": {"en": "is there a {o} at the start?", "zh": "开始时有{o}吗？"},
    "presence_end": {"en": "is there a {o} at the end?", "zh": "最后有{o}吗？"},
    "order_first": {"en": "what happens first?", "zh": "首先发生了什么？"},
    "order_last": {"en": "what happens last?", "zh": "最后发生了什么？"},
}
_NUM_CHOICES = 4

# --------------------------------------------------------------------------- #
# Clips
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Object:
  cls: int                       # its class at the clip's start (colour changes move it)
  radius: float                  # fraction of the frame's side
  rotation: float                # radians
  brightness: float              # scales its colour, as the image world's jitter
  start: tuple[float, float]     # centre (x, y) at frame 0, fractions of the side


@dataclasses.dataclass(frozen=True)
class Event:
  kind: str                      # KINDS
  action: str                    # ACTIONS
  obj: int                       # index into Clip.objects
  start_frame: int               # last frame before the change ...
  end_frame: int                 # ... and first frame after it (a move is linear in between)
  distance: float = 0.0          # moves: travel, fraction of the side
  from_colour: int = -1          # colour changes: indices into sw.COLOURS
  to_colour: int = -1
  phrasing: tuple[int, ...] = () # per caption (en first, then zh): which EN_/ZH_EVENT phrase

  @property
  def direction(self) -> str | None:
    return self.action.split("_", 1)[1] if self.kind == "move" else None


@dataclasses.dataclass(frozen=True)
class Clip:
  background: int                # index into sw.BACKGROUNDS
  background_seed: int
  objects: tuple[Object, ...]
  events: tuple[Event, ...]      # in time order
  styles: tuple[tuple[int, int, int], ...]   # per caption: (frame, connective, static or -1)


def frame_times(num_frames: int, fps: float) -> list[float]:
  return [k / fps for k in range(num_frames)]


def _seen_colours(shape: int) -> list[int]:
  return [k // sw.NUM_SHAPES for k in sw.SEEN if k % sw.NUM_SHAPES == shape]


def _pick(rng: np.random.Generator, options) -> Any:
  return options[int(rng.integers(len(options)))]


def _windows(num_events: int, num_frames: int) -> list[tuple[int, int]]:
  if num_events == 1:
    return [(0, num_frames - 1)]
  half = num_frames // 2
  return [(0, half - 1), (num_frames - half, num_frames - 1)]


def _timing(kind: str, window: tuple[int, int], num_frames: int,
            rng: np.random.Generator) -> tuple[int, int]:
  lo, hi = window
  if kind == "move":   # at least half the window long, so that it spans several frames
    length = int(rng.integers(max(1, (hi - lo + 1) // 2), hi - lo + 1))
    start = int(rng.integers(lo, hi - length + 1))
    return start, start + length
  # A change between two frames, with two frames of each state where the window allows.
  start = int(rng.integers(lo + (lo == 0), hi - (hi == num_frames - 1)))
  return start, start + 1


def _tracks(objects, events, num_frames: int):
  """Per object: visible (T,) bool, colour (T,) int, centre (T, 2) fractions."""
  j = np.arange(num_frames)
  out = []
  for o, obj in enumerate(objects):
    visible = np.ones(num_frames, bool)
    colour = np.full(num_frames, obj.cls // sw.NUM_SHAPES)
    disp = np.zeros((num_frames, 2))
    for ev in events:
      if ev.obj != o:
        continue
      if ev.kind == "appear":
        visible &= j >= ev.end_frame
      elif ev.kind == "disappear":
        visible &= j <= ev.start_frame
      elif ev.kind == "colour":
        colour[j >= ev.end_frame] = ev.to_colour
      else:
        progress = np.clip((j - ev.start_frame) / (ev.end_frame - ev.start_frame), 0.0, 1.0)
        disp += progress[:, None] * np.array(_VECTORS[ev.direction]) * ev.distance
    out.append((visible, colour, disp + np.array(obj.start)))
  return out


def _layout(rng: np.random.Generator, radii: list[float], events: list[Event],
            num_frames: int) -> list[tuple[float, float]] | None:
  """Start centres such that every object stays inside the frame and apart from the others at
  every frame where both are visible; None when 40 batches of candidates all fail."""
  n = len(radii)
  probes = [Object(0, r, 0.0, 1.0, (0.0, 0.0)) for r in radii]
  tracks = _tracks(probes, events, num_frames)
  disp = np.stack([t[2] for t in tracks])          # (n, T, 2): displacement from the start
  visible = np.stack([t[0] for t in tracks])
  r = np.array(radii)[:, None]
  lo = r + _MARGIN - disp.min(axis=1)
  hi = 1.0 - r - _MARGIN - disp.max(axis=1)
  if (lo > hi).any():
    return None
  pairs = [(a, b) for a in range(n) for b in range(a) if (visible[a] & visible[b]).any()]
  for _ in range(40):
    starts = rng.uniform(lo, hi, size=(32, n, 2))
    ok = np.ones(32, bool)
    for a, b in pairs:
      both = visible[a] & visible[b]
      gap = np.linalg.norm((starts[:, a, None] + disp[a, both]) - (starts[:, b, None]
                                                                   + disp[b, both]), axis=-1)
      ok &= gap.min(axis=-1) > radii[a] + radii[b] + _GAP
    if ok.any():
      first = starts[int(np.argmax(ok))]
      return [(float(x), float(y)) for x, y in first]
  return None


def _action(kind: str, rng: np.random.Generator) -> str:
  return f"move_{_pick(rng, DIRECTIONS)}" if kind == "move" else kind


def sample_clip(rng: np.random.Generator, split: str, num_frames: int = 8) -> Clip:
  """A clip of `split`: seen compositions only ("train", "eval_seen") or at least one held-out
  one ("eval")."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  if num_frames < MIN_FRAMES:
    raise ValueError(f"num_frames={num_frames}: a clip needs at least {MIN_FRAMES} frames")
  held = split == "eval"
  two_ok = num_frames >= MIN_FRAMES_TWO_EVENTS
  mode = ("order" if two_ok and rng.random() < 0.5 else "shape") if held else ""
  n = 2 if mode == "order" or (two_ok and rng.random() < _P_TWO_EVENTS) else 1
  if n == 1:
    kinds = (_pick(rng, KINDS),)
  else:
    kinds = _pick(rng, HELD_OUT_ORDERS if mode == "order" else ALL_ORDERS if held else SEEN_ORDERS)
  actions = [_action(k, rng) for k in kinds]
  hold = -1
  if mode == "shape":   # the held-out event: each action (hence each key) equally often
    hold = int(rng.integers(n))
    actions[hold] = _pick(rng, ACTIONS)
    kinds = tuple(a.split("_")[0] for a in actions)
  same = (n == 2 and all(k in ("move", "colour") for k in kinds)
          and not (kinds == ("move", "move") and actions[0] == actions[1])
          and rng.random() < _P_SAME_OBJECT)
  groups = [[0, 1]] if same else [[i] for i in range(n)]

  used: set[int] = set()
  objects, owner = [], {}
  for g, members in enumerate(groups):
    forced = [HELD_OUT_SHAPE[actions[i]] for i in members if i == hold]
    if forced:
      shapes = forced
    elif held:
      shapes = list(range(sw.NUM_SHAPES))
    else:
      shapes = [s for s in range(sw.NUM_SHAPES)
                if all(HELD_OUT_SHAPE[actions[i]] != s for i in members)]
    shape = int(_pick(rng, shapes))
    free = [c for c in _seen_colours(shape) if sw.class_index(c, shape) not in used]
    colours = [int(_pick(rng, free))]
    for i in members:
      if kinds[i] == "colour":
        colours.append(int(_pick(rng, [c for c in free if c != colours[-1]])))
    used |= {sw.class_index(c, shape) for c in colours}
    objects.append((sw.class_index(colours[0], shape), colours))
    for i in members:
      owner[i] = g
  if rng.random() < _P_DISTRACTOR:
    objects.append((int(_pick(rng, [k for k in sw.SEEN if k not in used])), []))

  events = []
  windows = _windows(n, num_frames)
  changes = {g: iter(zip(colours, colours[1:])) for g, (_, colours) in enumerate(objects)}
  for i, (kind, action) in enumerate(zip(kinds, actions)):
    start, end = _timing(kind, windows[i], num_frames, rng)
    g = owner[i]
    extra: dict[str, Any] = {}
    if kind == "move":
      extra["distance"] = float(rng.uniform(*_DISTANCE))
    if kind == "colour":
      extra["from_colour"], extra["to_colour"] = next(changes[g])
    phrasing = tuple(int(rng.integers(2)) for _ in range(2 * NUM_CAPTIONS))
    events.append(Event(kind, action, g, start, end, phrasing=phrasing, **extra))

  radii = [float(rng.uniform(*_RADIUS)) for _ in objects]
  starts = _layout(rng, radii, events, num_frames)
  if starts is None and len(objects) > len(groups):   # crowded: without the static object
    objects, radii = objects[:len(groups)], radii[:len(groups)]
    starts = _layout(rng, radii, events, num_frames)
  if starts is None:
    radii = [r * 0.8 for r in radii]
    starts = _layout(rng, radii, events, num_frames)
  if starts is None:
    raise RuntimeError(f"no layout for events {[e.action for e in events]}")
  objs = tuple(Object(cls, r, float(rng.uniform(-sw._MAX_ROTATION, sw._MAX_ROTATION)),
                      float(rng.uniform(0.85, 1.05)), xy)
               for (cls, _), r, xy in zip(objects, radii, starts))
  has_static = len(objs) > len(groups)
  styles = tuple((int(rng.integers(len(FRAMES["en"]))), int(rng.integers(len(CONNECTIVES["en"]))),
                  int(rng.integers(len(STATIC["en"])))
                  if has_static and rng.random() < _P_MENTION_STATIC else -1)
                 for _ in range(2 * NUM_CAPTIONS))
  return Clip(int(rng.integers(len(sw.BACKGROUNDS))), int(rng.integers(2**31)), objs,
              tuple(events), styles)


def mirror(clip: Clip, num_frames: int) -> Clip:
  """The clip played backwards: objects start where and as they ended, events run in reverse
  order, each mirrored (appear <-> disappear, directions and colours swapped); same wording."""
  last = num_frames - 1
  tracks = _tracks(clip.objects, clip.events, num_frames)
  objects = tuple(dataclasses.replace(
      obj, cls=sw.class_index(int(colour[-1]), obj.cls % sw.NUM_SHAPES),
      start=(float(centre[-1, 0]), float(centre[-1, 1])))
      for obj, (_, colour, centre) in zip(clip.objects, tracks))
  events = tuple(dataclasses.replace(
      ev, kind=MIRROR_KIND[ev.kind], action=MIRROR_ACTION[ev.action],
      start_frame=last - ev.end_frame, end_frame=last - ev.start_frame,
      from_colour=ev.to_colour, to_colour=ev.from_colour) for ev in reversed(clip.events))
  return dataclasses.replace(clip, objects=objects, events=events)


def compositions(clip: Clip) -> list[str]:
  """The held-out compositions the clip holds: "{shape}:{action}" and "order:{kind}>{kind}"."""
  keys = set()
  for ev in clip.events:
    shape = clip.objects[ev.obj].cls % sw.NUM_SHAPES
    if HELD_OUT_SHAPE[ev.action] == shape:
      keys.add(f"{sw.SHAPES[shape]['en']}:{ev.action}")
  order = tuple(ev.kind for ev in clip.events)
  if order in HELD_OUT_ORDERS:
    keys.add(f"order:{order[0]}>{order[1]}")
  return sorted(keys)


# --------------------------------------------------------------------------- #
# Rendering
# --------------------------------------------------------------------------- #


@functools.lru_cache(maxsize=64)   # one clip's objects and positions
def _coverage(shape: int, radius: float, rotation: float, cx: float, cy: float,
              size: int) -> tuple[np.ndarray, np.ndarray]:
  """An object's fill and outline coverage (size, size) in [0, 1], drawn as the image world's."""
  ss = sw._SUPERSAMPLE
  rot = np.array([[math.cos(rotation), -math.sin(rotation)],
                  [math.sin(rotation), math.cos(rotation)]])
  pts = (sw._POLYGONS[sw.SHAPES[shape]["en"]] @ rot.T * radius + (cx, cy)) * ss
  poly = [tuple(p) for p in pts.tolist()]
  fill = Image.new("L", (size * ss, size * ss), 0)
  ImageDraw.Draw(fill).polygon(poly, fill=255)
  edge = Image.new("L", (size * ss, size * ss), 0)
  width = max(1, round(sw._OUTLINE_PX * size / 48 * ss))
  ImageDraw.Draw(edge).polygon(poly, outline=255, width=width)
  out = (np.asarray(fill.reduce(ss), np.float64)[..., None] / 255,
         np.asarray(edge.reduce(ss), np.float64)[..., None] / 255)
  for a in out:
    a.flags.writeable = False
  return out


def render_clip(clip: Clip, frame_size: int = 32, num_frames: int = 8,
                with_masks: bool = False):
  """The frames, uint8 (T, S, S, 3); with `with_masks` also each object's pixels (T, n, S, S)
  bool (coverage >= 1/2, as the image world's masks)."""
  s = frame_size
  bg = sw._background(sw.BACKGROUNDS[clip.background]["name"], s,
                      np.random.default_rng(clip.background_seed))
  tracks = _tracks(clip.objects, clip.events, num_frames)
  outline = np.array(sw._OUTLINE_RGB, np.float64)
  frames = np.empty((num_frames, s, s, 3), np.uint8)
  masks = np.zeros((num_frames, len(clip.objects), s, s), bool)
  for j in range(num_frames):
    img = bg.copy()
    for o, (obj, (visible, colour, centre)) in enumerate(zip(clip.objects, tracks)):
      if not visible[j]:
        continue
      # Rounded so that a clip and its mirror, whose centres differ by float error, draw alike.
      cx, cy = (round(float(v) * s, 6) for v in centre[j])
      fill, edge = _coverage(obj.cls % sw.NUM_SHAPES, round(obj.radius * s, 6), obj.rotation,
                             cx, cy, s)
      rgb = np.array(sw.COLOURS[int(colour[j])]["rgb"], np.float64) * obj.brightness
      img = img * (1 - fill) + np.clip(np.rint(rgb), 0, 255) * fill
      img = img * (1 - edge) + outline * edge
      masks[j, o] = np.maximum(fill, edge)[..., 0] >= 0.5
    frames[j] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
  return (frames, masks) if with_masks else frames


# --------------------------------------------------------------------------- #
# Captions and questions
# --------------------------------------------------------------------------- #


def _name(cls: int, lang: str) -> str:
  return sw.CLASSES[cls][lang]


def _noun(cls: int, lang: str, article: str) -> str:
  if lang == "zh":
    return ("一个" if article == "a" else "") + _name(cls, lang)
  return sw._fix_articles(f"{article} {_name(cls, lang)}")


def _class_at(clip: Clip, ev: Event) -> int:
  """The class of the event's object when the event starts (earlier colour changes applied)."""
  cls = clip.objects[ev.obj].cls
  for other in clip.events:
    if other is ev:
      break
    if other.obj == ev.obj and other.kind == "colour":
      cls = sw.class_index(other.to_colour, cls % sw.NUM_SHAPES)
  return cls


def _event_text(clip: Clip, ev: Event, lang: str, variant: int, article: str,
                pronoun: bool = False) -> str:
  cls = _class_at(clip, ev)
  noun = _noun(cls, lang, article)
  templates = EN_EVENT if lang == "en" else ZH_EVENT
  return templates[ev.kind][variant].format(
      a=noun, s=_PRONOUN[lang] if pronoun else noun,
      dir=_DIRECTION_WORDS[lang].get(ev.direction or "", ""),
      to=sw.COLOURS[ev.to_colour][lang] if ev.kind == "colour" else "")


def caption(clip: Clip, lang: str, k: int = 0) -> str:
  """Caption k (0 <= k < NUM_CAPTIONS) of the clip in `lang`."""
  if lang not in ("en", "zh"):
    raise ValueError(f"unknown language {lang!r}")
  slot = (0 if lang == "en" else NUM_CAPTIONS) + k
  frame, connective, static = clip.styles[slot]
  parts = [_event_text(clip, ev, lang, ev.phrasing[slot], "a",
                       pronoun=i > 0 and ev.obj == clip.events[i - 1].obj)
           for i, ev in enumerate(clip.events)]
  text = parts[0] if len(parts) == 1 else CONNECTIVES[lang][connective].format(*parts)
  if static >= 0:
    cls = clip.objects[-1].cls
    text += STATIC[lang][static].format(a=_noun(cls, lang, "a"), o=_name(cls, lang))
  return FRAMES[lang][frame].format(text)


def captions(clip: Clip) -> dict[str, list[str]]:
  return {lang: [caption(clip, lang, k) for k in range(NUM_CAPTIONS)] for lang in ("en", "zh")}


def _statement(clip: Clip, ev: Event) -> dict[str, str]:
  """A standalone sentence of the event ("the red circle moves left")."""
  return {lang: _event_text(clip, ev, lang, 0, "the") for lang in ("en", "zh")}


def _choice(rng: np.random.Generator, kind: str, question: dict[str, str],
            options: list[dict[str, str]], answer: int) -> list[dict[str, Any]]:
  """The question as a multiple-choice item (options shuffled) and as an open one."""
  order = [int(i) for i in rng.permutation(len(options))]
  return [{"type": kind, "format": "choice", "question": question,
           "choices": {lang: [options[i][lang] for i in order] for lang in ("en", "zh")},
           "answer": order.index(answer)},
          {"type": kind, "format": "open", "question": question, "answer": options[answer]}]


def _options(rng: np.random.Generator, correct: str, hard: str | None,
             pool: list[str]) -> list[str]:
  """`correct` first, then the hard negative (when another), then random others from `pool`."""
  out = [correct] + ([hard] if hard is not None and hard != correct else [])
  rest = [p for p in pool if p not in out]
  picks = rng.permutation(len(rest))[:max(0, _NUM_CHOICES - len(out))]
  return out + [rest[int(i)] for i in picks]


def questions(clip: Clip, rng: np.random.Generator, num_frames: int) -> list[dict[str, Any]]:
  """Every question the clip answers (see QUESTION_TYPES), each as a choice and an open item.
  Objects are named by their class at the clip's start."""
  out: list[dict[str, Any]] = []

  def ask(template: str, cls: int = 0) -> dict[str, str]:
    return {lang: sw._fix_articles(QUESTIONS[template][lang].format(o=_name(cls, lang)))
            for lang in ("en", "zh")}

  for o, obj in enumerate(clip.objects):
    mine = [ev for ev in clip.events if ev.obj == o]
    if len(mine) == 1:
      ev = mine[0]
      acts = _options(rng, ev.action, MIRROR_ACTION[ev.action], list(ACTIONS))
      out += _choice(rng, "action", ask("action", obj.cls),
                     [{lang: ACTION_TEXT[lang][a] for lang in ("en", "zh")} for a in acts], 0)
    moves = [ev for ev in mine if ev.kind == "move"]
    if len(moves) == 1:
      dirs = _options(rng, moves[0].direction, None, list(DIRECTIONS))
      out += _choice(rng, "direction", ask("direction", obj.cls),
                     [{lang: _DIRECTION_WORDS[lang][d] for lang in ("en", "zh")} for d in dirs], 0)
    changes = [ev for ev in mine if ev.kind == "colour"]
    if len(changes) == 1:
      ev = changes[0]
      cols = _options(rng, ev.to_colour, ev.from_colour, list(range(sw.NUM_COLOURS)))
      out += _choice(rng, "colour_to", ask("colour_to", obj.cls),
                     [{lang: sw.COLOURS[c][lang] for lang in ("en", "zh")} for c in cols], 0)
    if not changes and (any(ev.kind in ("appear", "disappear") for ev in mine)
                        or (not mine and rng.random() < 0.5)):
      when = "presence_start" if rng.random() < 0.5 else "presence_end"
      present = not any(ev.kind == ("appear" if when == "presence_start" else "disappear")
                        for ev in mine)
      out += _choice(rng, "presence", ask(when, obj.cls),
                     [{lang: YES_NO[lang][i] for lang in ("en", "zh")} for i in (0, 1)],
                     0 if present else 1)
  if len(clip.events) == 2:
    first = rng.random() < 0.5
    target = clip.events[0 if first else 1]
    backwards = mirror(clip, num_frames)   # its events: the hard negatives
    options = [_statement(clip, target)] + [_statement(clip, e) for e in clip.events
                                            if e is not target]
    options += [_statement(backwards, e) for e in backwards.events]
    unique = []
    for opt in options:
      if opt not in unique:
        unique.append(opt)
    out += _choice(rng, "order", ask("order_first" if first else "order_last"),
                   unique, 0)
  return out


def scene_label(clip: Clip) -> dict[str, Any]:
  activities = sorted({_ACTIVITY[ev.kind] for ev in clip.events})
  return {"background": sw.BACKGROUNDS[clip.background]["name"],
          "activity": activities[0] if len(activities) == 1 else "mixed",
          "activities": activities, "num_objects": len(clip.objects),
          "num_events": len(clip.events)}


def _event_meta(clip: Clip, ev: Event, times: list[float]) -> dict[str, Any]:
  out = {"kind": ev.kind, "action": ev.action, "object": _class_at(clip, ev),
         "object_index": ev.obj, "shape": sw.SHAPES[clip.objects[ev.obj].cls % sw.NUM_SHAPES]["en"],
         "start_frame": ev.start_frame, "end_frame": ev.end_frame,
         "start_time": times[ev.start_frame], "end_time": times[ev.end_frame]}
  if ev.kind == "move":
    out["direction"] = ev.direction
  if ev.kind == "colour":
    out["from_colour"] = sw.COLOURS[ev.from_colour]["en"]
    out["to_colour"] = sw.COLOURS[ev.to_colour]["en"]
  return out


# --------------------------------------------------------------------------- #
# Records
# --------------------------------------------------------------------------- #


def clip_for(seed: int, split: str, index: int, num_frames: int = 8) -> Clip:
  """The clip of (seed, split, index); in mirrored splits clip 2k+1 is clip 2k backwards."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  if split in MIRRORED_SPLITS:
    clip = sample_clip(sw.record_rng(seed, "video/" + split, index // 2), split, num_frames)
    return mirror(clip, num_frames) if index % 2 else clip
  return sample_clip(sw.record_rng(seed, "video/" + split, index), split, num_frames)


def make_clip(seed: int, split: str, index: int, frame_size: int = 32, num_frames: int = 8,
              fps: float = 4.0) -> dict[str, Any]:
  """The video record (bigvl.data.formats.records) of one (seed, split, index)."""
  clip = clip_for(seed, split, index, num_frames)
  held = compositions(clip)
  if bool(held) != (split == "eval"):   # the sampler's promise, checked on every record
    raise AssertionError(f"{split} clip {index} holds held-out compositions {held}")
  times = frame_times(num_frames, fps)
  by_lang = captions(clip)
  rng = sw.record_rng(seed, f"video/{split}/record", index)
  if split == "train":
    lang = "zh" if rng.random() < _P_CHINESE else "en"
  else:
    lang = "en"
  meta = {
      "captions": by_lang["en"] + by_lang["zh"],
      "captions_by_lang": by_lang,
      "events": [_event_meta(clip, ev, times) for ev in clip.events],
      "objects": [{"class": o.cls, "static": not any(ev.obj == k for ev in clip.events)}
                  for k, o in enumerate(clip.objects)],
      "composition": "|".join(held),
      "qa": questions(clip, sw.record_rng(seed, f"video/{split}/qa", index), num_frames),
      "scene": scene_label(clip),
      "fps": fps,
  }
  if split in MIRRORED_SPLITS:
    meta["pair"] = index // 2
    meta["mirrored"] = bool(index % 2)
  frames = render_clip(clip, frame_size, num_frames)
  return {
      "id": SPLIT_ID_OFFSET[split] + index,
      "frames": [sw.encode_image(Image.fromarray(f)) for f in frames],
      "frame_times": times,
      "caption": by_lang[lang][0],
      "lang": lang,
      "meta": meta,
  }


def corpus(seed: int = 0, num_clips: int = 4000, num_frames: int = 8) -> Iterator[str]:
  """Every kind of sentence the tokenizer must know: captions of clips of every split (sampled,
  not rendered), their questions and answers, and every class, colour, direction and action."""
  for i in range(num_clips):
    split = SPLITS[i % len(SPLITS)]
    clip = clip_for(seed, split, i, num_frames)
    for texts in captions(clip).values():
      yield from texts
    for q in questions(clip, sw.record_rng(seed, "video/corpus", i), num_frames):
      yield from q["question"].values()
      if q["format"] == "open":
        yield from q["answer"].values()
  for lang in ("en", "zh"):
    for c in sw.CLASSES:
      yield c[lang]
    for c in sw.COLOURS:
      yield c[lang]
    yield from _DIRECTION_WORDS[lang].values()
    yield from ACTION_TEXT[lang].values()
    yield from YES_NO[lang]


def describe() -> dict[str, Any]:
  """The world's vocabulary, compositions and questions as JSON-able data (videos.json)."""
  return {
      "splits": list(SPLITS),
      "mirrored_splits": list(MIRRORED_SPLITS),
      "classes": [{"index": k, "en": sw.CLASSES[k]["en"], "zh": sw.CLASSES[k]["zh"]}
                  for k in sw.SEEN],
      "colours": [{"en": c["en"], "zh": c["zh"]} for c in sw.COLOURS],
      "shapes": [{"en": s["en"], "zh": s["zh"]} for s in sw.SHAPES],
      "backgrounds": [b["name"] for b in sw.BACKGROUNDS],
      "event_kinds": list(KINDS),
      "directions": list(DIRECTIONS),
      "actions": list(ACTIONS),
      "mirror_action": MIRROR_ACTION,
      "held_out": {
          "shape_action": {a: sw.SHAPES[s]["en"] for a, s in HELD_OUT_SHAPE.items()},
          "orders": [list(o) for o in HELD_OUT_ORDERS],
          "keys": sorted({f"{sw.SHAPES[s]['en']}:{a}" for a, s in HELD_OUT_SHAPE.items()}
                         | {f"order:{a}>{b}" for a, b in HELD_OUT_ORDERS}),
      },
      "seen_orders": [list(o) for o in SEEN_ORDERS],
      "question_types": list(QUESTION_TYPES),
      "question_templates": QUESTIONS,
      # The answers each type of question can have; "order" answers are event sentences.
      "qa_answers": {
          "action": {lang: list(ACTION_TEXT[lang].values()) for lang in ("en", "zh")},
          "direction": {lang: list(_DIRECTION_WORDS[lang].values()) for lang in ("en", "zh")},
          "colour_to": {lang: [c[lang] for c in sw.COLOURS] for lang in ("en", "zh")},
          "presence": {lang: list(YES_NO[lang]) for lang in ("en", "zh")},
          "order": "an event sentence",
      },
      "scene_activities": list(SCENE_ACTIVITIES),
      "caption_templates": {"event": {"en": EN_EVENT, "zh": ZH_EVENT},
                            "connectives": CONNECTIVES, "frames": FRAMES, "static": STATIC},
      "num_captions": NUM_CAPTIONS,
  }
