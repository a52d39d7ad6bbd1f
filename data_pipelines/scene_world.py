"""The scene world: pictures of one to four different objects of the image world (its colours,
shapes, outlines and backgrounds), each with its box, and what is said about them: the labels of
the picture (multi-label recognition), questions with answers (VQA), referring expressions of one
object among the others (referring-expression comprehension), and a caption with a near miss (image–
text matching).

Two kinds of held-out combinations, one evaluation split each:
- "eval_pairs": pairs of objects never seen together. Twelve pairs of seen classes that share a
  colour or a shape (`HELD_OUT_PAIRS`) never meet in a training scene; every eval_pairs scene holds
  one of them, and its questions and its referring expression are about one object of that pair
  (the "target"), the other standing beside it.
- "eval": (colour, shape) classes never seen, from the image world (`synthetic_world.HELD_OUT`):
  training scenes hold only seen classes; every "eval" scene holds a held-out class and is asked
  about it (the multi-label adapter's pictures, whose labels are all 40 classes).
Distractors share the target's colour or its shape, so that naming one attribute is never enough: a
question "is there a red circle?" beside a red square and a blue circle, or "the red circle" among
them, is answered only by binding colour to shape.

Everything is a pure function of (seed, split, index), as in the image world.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines import synthetic_world as sw

SPLITS = ("train", "eval", "eval_pairs")
SPLIT_ID_OFFSET = {"train": 3_000_000_000, "eval": 4_000_000_000, "eval_pairs": 5_000_000_000}
MAX_OBJECTS = 4
# Objects per scene (1 to 4). Scenes of one object still carry questions and a caption; a referring
# expression needs a choice, so it is asked in scenes of two or more.
_P_COUNT = (0.1, 0.35, 0.35, 0.2)
_P_SAME_COLOUR, _P_SAME_SHAPE = 0.7, 0.7   # a distractor sharing the target's colour / shape
# Radius over the picture's side; a 2 x 2 grid of cells keeps four objects apart.
_RADIUS = (0.13, 0.18)

QUESTION_TYPES = ("colour", "shape", "exists")
ANSWERS: list[str] = ([c["en"] for c in sw.COLOURS] + [s["en"] for s in sw.SHAPES]
                      + ["yes", "no"])
ANSWER_INDEX = {a: i for i, a in enumerate(ANSWERS)}

# Questions name what they ask about; "{col}" / "{shp}" are the attribute names.
QUESTIONS = {
    "colour": {"en": ["what colour is the {shp}?", "which colour does the {shp} have?"],
               "zh": ["{shp}是什么颜色的？", "图中的{shp}是什么颜色？"]},
    "shape": {"en": ["what shape is the {col} one?", "which shape is {col}?"],
              "zh": ["{col}的图形是什么形状？", "图中{col}的是什么形状？"]},
    "exists": {"en": ["is there a {col} {shp}?", "is there a {col} {shp} in the image?"],
               "zh": ["图中有{col}{shp}吗？", "画面中有{col}的{shp}吗？"]},
}
REFERRING = {"en": ["the {col} {shp}", "the {shp} that is {col}", "the {col} {shp} in the image"],
             "zh": ["{col}的{shp}", "那个{col}{shp}", "图中{col}的{shp}"]}


def _colour(k: int, lang: str) -> str:
  return sw.COLOURS[k][lang]


def _shape(k: int, lang: str) -> str:
  return sw.SHAPES[k][lang]


def _article(text: str) -> str:
  return sw._fix_articles(text)


def _held_out_pairs() -> frozenset[frozenset[int]]:
  """Per shape, its seen colours' first two and next two classes; per colour 0, 3, 6 and 9, its
  two seen classes: 12 pairs of seen classes that share a shape or a colour."""
  pairs = []
  for shp in range(sw.NUM_SHAPES):
    same = sorted(k for k in sw.SEEN if k % sw.NUM_SHAPES == shp)
    pairs += [(same[0], same[1]), (same[2], same[3])]
  for col in (0, 3, 6, 9):
    same = sorted(k for k in sw.SEEN if k // sw.NUM_SHAPES == col)
    pairs.append((same[0], same[1]))
  return frozenset(frozenset(p) for p in pairs)


HELD_OUT_PAIRS = _held_out_pairs()
_PARTNERS = {k: sorted(next(iter(p - {k})) for p in HELD_OUT_PAIRS if k in p)
             for k in sw.SEEN if any(k in p for p in HELD_OUT_PAIRS)}


def _class_pool(split: str) -> list[int]:
  return list(range(sw.NUM_CLASSES)) if split == "eval" else list(sw.SEEN)


def sample_objects(rng: np.random.Generator, split: str) -> tuple[list[int], int]:
  """(classes of the scene's objects, all different; the target's position among them)."""
  pool = _class_pool(split)
  count = int(rng.choice(MAX_OBJECTS, p=_P_COUNT)) + 1
  if split == "eval":
    target = int(sw.HELD_OUT[int(rng.integers(len(sw.HELD_OUT)))])
  elif split == "eval_pairs":
    count = max(count, 2)
    keys = sorted(_PARTNERS)
    target = int(keys[int(rng.integers(len(keys)))])
  else:
    target = int(pool[int(rng.integers(len(pool)))])
  col, shp = divmod(target, sw.NUM_SHAPES)
  chosen = [target]
  if split == "eval_pairs":   # the partner it never met in training
    chosen.append(int(_PARTNERS[target][int(rng.integers(len(_PARTNERS[target])))]))

  def add(candidates):
    candidates = [k for k in candidates if k not in chosen]
    if split == "train":   # no held-out pair ever meets in training
      candidates = [k for k in candidates
                    if not any(frozenset((k, c)) in HELD_OUT_PAIRS for c in chosen)]
    if candidates and len(chosen) < count:
      chosen.append(int(candidates[int(rng.integers(len(candidates)))]))

  if rng.random() < _P_SAME_COLOUR:
    add([k for k in pool if k // sw.NUM_SHAPES == col])
  if rng.random() < _P_SAME_SHAPE:
    add([k for k in pool if k % sw.NUM_SHAPES == shp])
  while len(chosen) < count:
    add(pool)
  order = rng.permutation(len(chosen))
  objects = [chosen[i] for i in order]
  return objects, int(np.flatnonzero(order == 0)[0])


def render_scene(classes: list[int], image_size: int, rng: np.random.Generator
                 ) -> tuple[Image.Image, list[list[float]], np.ndarray]:
  """The picture, each object's box [x0, y0, x1, y1] (pixels, from its drawn pixels) and the
  objects' mask (h, w) int8: 0 background, k + 1 object k."""
  s = image_size
  ss = sw._SUPERSAMPLE
  bg = sw._background(sw.BACKGROUNDS[int(rng.integers(len(sw.BACKGROUNDS)))]["name"], s, rng)
  canvas = Image.fromarray(np.clip(np.rint(bg), 0, 255).astype(np.uint8), "RGB")
  cells = rng.permutation(4)[:len(classes)]
  labels = np.zeros((s, s), np.int8)
  boxes = []
  edge_width = max(1, round(sw._OUTLINE_PX * s / 48 * ss))
  for k, (cls, cell) in enumerate(zip(classes, cells)):
    col, shp = divmod(cls, sw.NUM_SHAPES)
    r = _RADIUS[int(rng.integers(2))] * s * rng.uniform(0.9, 1.1)
    row, column = divmod(int(cell), 2)
    half = s / 2
    lo_x, lo_y = column * half + r + 1, row * half + r + 1
    hi_x, hi_y = (column + 1) * half - r - 1, (row + 1) * half - r - 1
    cx = rng.uniform(lo_x, max(lo_x, hi_x))
    cy = rng.uniform(lo_y, max(lo_y, hi_y))
    theta = rng.uniform(-sw._MAX_ROTATION, sw._MAX_ROTATION)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    pts = (sw._POLYGONS[sw.SHAPES[shp]["en"]] @ rot.T * r + (cx, cy)) * ss
    poly = [tuple(p) for p in pts.tolist()]
    fill = Image.new("L", (s * ss, s * ss), 0)
    ImageDraw.Draw(fill).polygon(poly, fill=255)
    edge = Image.new("L", (s * ss, s * ss), 0)
    ImageDraw.Draw(edge).polygon(poly, outline=255, width=edge_width)
    fill, edge = fill.reduce(ss), edge.reduce(ss)
    rgb = np.array(sw.COLOURS[col]["rgb"], np.float64) * rng.uniform(0.85, 1.05)
    canvas.paste(tuple(int(v) for v in np.clip(np.rint(rgb), 0, 255)), (0, 0, s, s), fill)
    canvas.paste(sw._OUTLINE_RGB, (0, 0, s, s), edge)
    mine = np.maximum(np.asarray(fill), np.asarray(edge)) >= 128
    labels[mine] = k + 1
    ys, xs = np.nonzero(mine)
    boxes.append([float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)])
  return canvas, boxes, labels


def _questions(classes: list[int], target: int, rng: np.random.Generator) -> list[dict[str, Any]]:
  """The answerable questions about the target: its colour (when its shape is the only one of its
  kind in the scene), its shape (when its colour is), and whether a (colour, shape) is there (yes
  for the target; no for a colour and a shape that are both in the scene, never together, or, where
  there is none, another class of the target's colour or shape that is not in the scene)."""
  cols = [k // sw.NUM_SHAPES for k in classes]
  shps = [k % sw.NUM_SHAPES for k in classes]
  col, shp = cols[target], shps[target]
  out = []

  def ask(kind, c, s, answer):
    q = {lang: _article(QUESTIONS[kind][lang][int(rng.integers(2))].format(
        col=_colour(c, lang), shp=_shape(s, lang))) for lang in ("en", "zh")}
    out.append({"type": kind, "en": q["en"], "zh": q["zh"], "answer": answer})

  if shps.count(shp) == 1:
    ask("colour", col, shp, ANSWERS[col])
  if cols.count(col) == 1:
    ask("shape", col, shp, sw.SHAPES[shp]["en"])
  if rng.random() < 0.5:
    ask("exists", col, shp, "yes")
  else:
    absent = [(c, s) for c in set(cols) for s in set(shps)
              if sw.class_index(c, s) not in classes]
    if not absent:   # every object shares the target's colour or shape: another colour, or
      # another shape, of the target that is not in the scene
      absent = [(c, shp) for c in range(sw.NUM_COLOURS) if c != col] + [
          (col, s) for s in range(sw.NUM_SHAPES) if s != shp]
      absent = [(c, s) for c, s in absent if sw.class_index(c, s) not in classes]
    c, s = absent[int(rng.integers(len(absent)))]
    ask("exists", c, s, "no")
  return out


def _list_names(classes: list[int], lang: str) -> str:
  names = [sw.CLASSES[k][lang] for k in classes]
  if lang == "zh":
    return "、".join(names)
  names = [_article("a " + n) for n in names]
  return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _caption(classes: list[int], lang: str) -> str:
  return (f"a picture of {_list_names(classes, 'en')}" if lang == "en"
          else f"图中有{_list_names(classes, 'zh')}")


def _near_miss(classes: list[int], split: str, rng: np.random.Generator) -> list[int]:
  """The scene's classes with one object's colour or shape changed (to a class not in the scene)."""
  pool = set(_class_pool(split))
  for k in rng.permutation(len(classes)):
    col, shp = divmod(classes[int(k)], sw.NUM_SHAPES)
    options = [sw.class_index(c, shp) for c in range(sw.NUM_COLOURS)] + [
        sw.class_index(col, s) for s in range(sw.NUM_SHAPES)]
    options = [o for o in options if o in pool and o not in classes]
    if options:
      out = list(classes)
      out[int(k)] = options[int(rng.integers(len(options)))]
      return out
  raise AssertionError("no near miss")   # every class has another of its colour in the pool


def make_scene(seed: int, split: str, index: int, image_size: int = 48) -> dict[str, Any]:
  """The record (bigvl.data.formats.records) of one scene; its meta holds everything said of it."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  rng = sw.record_rng(seed, "scene/" + split, index)
  classes, target = sample_objects(rng, split)
  image, boxes, _ = render_scene(classes, image_size, rng)
  col, shp = divmod(classes[target], sw.NUM_SHAPES)
  refer = {lang: REFERRING[lang][int(rng.integers(len(REFERRING[lang])))].format(
      col=_colour(col, lang), shp=_shape(shp, lang)) for lang in ("en", "zh")}
  miss = _near_miss(classes, split, rng)
  lang = "zh" if rng.random() < 0.5 else "en"
  meta = {
      "objects": [{"class": k, "box": b, "held_out": k in sw.HELD_OUT}
                  for k, b in zip(classes, boxes)],
      "labels": sorted(classes),
      "target": target,
      "questions": _questions(classes, target, rng),
      "refer": refer,
      "captions": {lang: _caption(classes, lang) for lang in ("en", "zh")},
      "near_miss": {lang: _caption(miss, lang) for lang in ("en", "zh")},
  }
  return {"id": SPLIT_ID_OFFSET[split] + index, "image": sw.encode_image(image),
          "caption": meta["captions"][lang], "lang": lang, "meta": meta}


def describe() -> dict[str, Any]:
  """What evaluators and systems read of this world (scenes.json), instead of importing it."""
  return {
      "labels": [{"en": c["en"], "zh": c["zh"]} for c in sw.CLASSES],
      "held_out": list(sw.HELD_OUT),
      "held_out_pairs": sorted(sorted(p) for p in HELD_OUT_PAIRS),
      "answers": ANSWERS,
      "question_types": list(QUESTION_TYPES),
      # The answers each type of question can have (VQA's chance and prior baselines).
      "type_answers": {"colour": [c["en"] for c in sw.COLOURS],
                       "shape": [s["en"] for s in sw.SHAPES], "exists": ["yes", "no"]},
      "splits": list(SPLITS),
      "max_objects": MAX_OBJECTS,
  }
