"""The synthetic world: coloured shapes on muted backgrounds, captioned in English and Chinese.

It exists so that a tiny M²-Encoder can be trained on a laptop CPU in minutes and
still be judged the way the real model is: zero-shot classification on concepts it
never saw paired. A class is a (colour, shape) pair: 10 colours × 4 shapes = 40 classes.
Twenty pairs are held out of training, two shapes per colour and five colours per shape, so
every colour and every shape is still seen with other partners and only the *combination* is
new; and among the held-out classes each colour comes with two shapes and each shape with five
colours, so telling them apart needs both attributes.

Everything is a pure function of (seed, split, index): each record gets its own
RNG, so shards can be generated in any order, by any number of workers, with
identical bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import re
import zlib
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw

from bigvl.data.prompts import format_prompt

# --------------------------------------------------------------------------- #
# Attributes and class material
# --------------------------------------------------------------------------- #

# Saturated, well-separated hues; backgrounds stay near-grey so none can be
# mistaken for one of these.
COLOURS: list[dict[str, Any]] = [
    {"en": "red", "zh": "红色", "rgb": (220, 30, 35)},
    {"en": "green", "zh": "绿色", "rgb": (35, 170, 50)},
    {"en": "blue", "zh": "蓝色", "rgb": (35, 80, 225)},
    {"en": "yellow", "zh": "黄色", "rgb": (240, 215, 30)},
    {"en": "purple", "zh": "紫色", "rgb": (145, 50, 195)},
    {"en": "orange", "zh": "橙色", "rgb": (245, 135, 25)},
    {"en": "pink", "zh": "粉色", "rgb": (250, 120, 200)},
    {"en": "cyan", "zh": "青色", "rgb": (20, 200, 210)},
    {"en": "brown", "zh": "棕色", "rgb": (135, 75, 30)},
    {"en": "white", "zh": "白色", "rgb": (248, 248, 248)},
]

SHAPES: list[dict[str, str]] = [
    {"en": "circle", "en_plural": "circles", "zh": "圆形"},
    {"en": "square", "en_plural": "squares", "zh": "正方形"},
    {"en": "triangle", "en_plural": "triangles", "zh": "三角形"},
    {"en": "cross", "en_plural": "crosses", "zh": "十字形"},
]
# Four geometrically distinct shapes (round, right angles, diagonals, a plus) and ten colours:
# 40 classes. Shape is what a small ViT learns slowly, so the world spends its classes on colours;
# star and heart are still drawable (see _unit_polygons) for worlds that want them.

SIZES: list[dict[str, Any]] = [
    {"en": ("small", "little"), "zh": ("小的", "较小的")},
    {"en": ("large", "big"), "zh": ("大的", "较大的")},
]

# Row-major 3x3 grid; only single objects get a position (and a caption for it).
POSITIONS: list[dict[str, Any]] = [
    {"en": ("at the top left", "in the top left corner"), "zh": "左上角"},
    {"en": ("at the top",), "zh": "上方"},
    {"en": ("at the top right", "in the top right corner"), "zh": "右上角"},
    {"en": ("on the left",), "zh": "左侧"},
    {"en": ("in the centre", "in the middle"), "zh": "中央"},
    {"en": ("on the right",), "zh": "右侧"},
    {"en": ("at the bottom left", "in the bottom left corner"), "zh": "左下角"},
    {"en": ("at the bottom",), "zh": "下方"},
    {"en": ("at the bottom right", "in the bottom right corner"), "zh": "右下角"},
]

BACKGROUNDS: list[dict[str, str]] = [
    {"name": "plain", "en": "plain", "zh": "纯色"},
    {"name": "gradient", "en": "gradient", "zh": "渐变"},
    {"name": "noise", "en": "noisy", "zh": "噪点"},
    {"name": "stripes", "en": "striped", "zh": "条纹"},
    {"name": "checker", "en": "checkered", "zh": "格子"},
]

NUM_COLOURS = len(COLOURS)
NUM_SHAPES = len(SHAPES)
NUM_CLASSES = NUM_COLOURS * NUM_SHAPES


def class_index(colour: int, shape: int) -> int:
  return colour * NUM_SHAPES + shape


CLASSES: list[dict[str, Any]] = [
    {
        "index": class_index(c, s),
        "colour": COLOURS[c]["en"],
        "shape": SHAPES[s]["en"],
        "en": f"{COLOURS[c]['en']} {SHAPES[s]['en']}",
        "en_plural": f"{COLOURS[c]['en']} {SHAPES[s]['en_plural']}",
        "zh": f"{COLOURS[c]['zh']}{SHAPES[s]['zh']}",
    }
    for c in range(NUM_COLOURS)
    for s in range(NUM_SHAPES)
]

# Two held-out shapes per colour, cycling through the six pairs of shapes: each colour keeps two
# training shapes and each shape five training colours.
_SHAPE_PAIRS = [(0, 1), (2, 3), (0, 2), (1, 3), (0, 3), (1, 2)]
HELD_OUT: list[int] = sorted(class_index(c, s) for c in range(NUM_COLOURS)
                             for s in _SHAPE_PAIRS[c % len(_SHAPE_PAIRS)])
SEEN: list[int] = [k for k in range(NUM_CLASSES) if k not in HELD_OUT]

# Pictures show one to three objects, so the prompts of each class are an ensemble over the counts:
# prompts that all said "one" scored two- and three-object pictures 0.11-0.17 lower (0.80 against
# 0.85 top-1 over the held-out classes for the same checkpoint). English templates fill "{}" with the
# singular name and "{plural}" with the plural (see zeroshot_name and
# bigvl.data.prompts.format_prompt). No article in front of "{}": "a orange circle" would be
# wrong.
ZEROSHOT_TEMPLATES: dict[str, list[str]] = {
    "en": [
        "a photo of one {}.", "a photo of two {plural}.", "a photo of three {plural}.",
        "an image showing one {}.", "an image showing two {plural}.",
        "an image showing three {plural}.",
        "one {}.", "two {plural}.", "three {plural}.",
        "there is one {} in the image.", "there are two {plural} in the image.",
        "there are three {plural} in the image.",
    ],
    "zh": [
        "一张{}的照片。", "一张{}的图片。",
        "图中有一个{}。", "图中有两个{}。", "图中有三个{}。",
        "一个{}", "两个{}", "三个{}",
        "这是一个{}。", "这是两个{}。", "这是三个{}。",
        "画面中有一个{}。", "画面中有两个{}。", "画面中有三个{}。",
    ],
}


def zeroshot_name(k: int, lang: str) -> str | dict[str, str]:
  """Class `k`'s name for ZEROSHOT_TEMPLATES[lang]: English has a singular and a plural form."""
  c = CLASSES[k]
  if lang == "en":
    return {"name": c["en"], "plural": c["en_plural"]}
  return c[lang]


SPLITS = ("train", "eval_heldout", "eval_seen")
# Ids are globally unique across splits, so a mixed stream never collides.
SPLIT_ID_OFFSET = {"train": 0, "eval_heldout": 1_000_000_000, "eval_seen": 2_000_000_000}

# --------------------------------------------------------------------------- #
# Scene attributes
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Attributes:
  """What a caption may talk about; geometry is sampled separately at render time."""

  colour: int
  shape: int
  count: int  # 1..3, all objects identical in shape and colour.
  size: int  # 0 small, 1 large.
  position: int | None  # index into POSITIONS; only when count == 1.
  background: int  # index into BACKGROUNDS.

  @property
  def cls(self) -> int:
    return class_index(self.colour, self.shape)

  def meta(self) -> dict[str, Any]:
    return {
        "class": self.cls,
        "colour": COLOURS[self.colour]["en"],
        "shape": SHAPES[self.shape]["en"],
        "count": self.count,
        "size": SIZES[self.size]["en"][0],
        "position": None if self.position is None else POSITIONS[self.position]["en"][0],
        "background": BACKGROUNDS[self.background]["name"],
        "held_out": self.cls in HELD_OUT,
    }


def sample_attributes(rng: np.random.Generator, cls: int) -> Attributes:
  count = int(rng.choice(3, p=[0.5, 0.25, 0.25])) + 1
  return Attributes(
      colour=cls // NUM_SHAPES,
      shape=cls % NUM_SHAPES,
      count=count,
      size=int(rng.integers(2)),
      position=int(rng.integers(len(POSITIONS))) if count == 1 else None,
      background=int(rng.integers(len(BACKGROUNDS))),
  )


def record_rng(seed: int, split: str, index: int) -> np.random.Generator:
  # crc32, not hash(): Python salts str hashes per process.
  return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


# --------------------------------------------------------------------------- #
# Captions
# --------------------------------------------------------------------------- #

_EN_COUNT = {2: "two", 3: "three"}
_ZH_COUNT = {1: "一个", 2: "两个", 3: "三个"}
_ZH_THIS = {1: "这个", 2: "这两个", 3: "这三个"}

# Optional mentions: size, position and background only sometimes, as in real alt-text.
_P_SIZE, _P_POSITION, _P_BACKGROUND = 0.4, 0.35, 0.25
# Training captions sometimes name only the shape ("a triangle", "三个圆形") or only the colour
# ("two pink shapes"), as real alt-text often does. A shape-only caption can only be matched to its
# image by shape, which is what a contrastive model otherwise learns last: colour alone already
# separates most of a batch, and the text tower, seeing no use for the shape words yet, gives the
# image tower no shape signal either (a plateau). Shape-only captions break it early.
_P_SHAPE_ONLY, _P_COLOUR_ONLY = 0.3, 0.05
# Chinese captions are a little more than half: Chinese is read one character at a time (see
# build_world._isolate_cjk), so a colour or shape takes two or three tokens where English takes one,
# and learning them needs more examples. With 60% (against 50%) the Chinese held-out top-1 rose from
# 0.72 to 0.75 and the English one fell from 0.80 to 0.78 (600 steps, 8-px patches, one prompt each).
_P_CHINESE = 0.6
_EN_THING = ("shape", "shapes")
_ZH_THING = "图形"


def _partial(rng: np.random.Generator, partial: bool | tuple[bool, bool]) -> tuple[bool, bool]:
  """(name the colour, name the shape); `partial` may already be that pair."""
  if isinstance(partial, tuple):
    return partial
  if partial:
    u = rng.random()
    if u < _P_SHAPE_ONLY:
      return False, True
    if u < _P_SHAPE_ONLY + _P_COLOUR_ONLY:
      return True, False
  return True, True


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
  return options[int(rng.integers(len(options)))]


def _fix_articles(text: str) -> str:
  return re.sub(r"\ba ([aeiou])", r"an \1", text)


def _en_slots(a: Attributes, rng: np.random.Generator, partial: bool = False) -> dict[str, str]:
  use_col, use_shp = _partial(rng, partial)
  use_size = rng.random() < _P_SIZE
  use_pos = a.position is not None and rng.random() < _P_POSITION
  use_bg = rng.random() < _P_BACKGROUND
  bg = BACKGROUNDS[a.background]["en"]
  if a.count == 1:
    n = "one" if rng.random() < 0.3 else "a"
  else:
    n = _EN_COUNT[a.count]
  return {
      "n": n,
      "nn": "" if a.count == 1 else _EN_COUNT[a.count] + " ",
      "size": _pick(rng, SIZES[a.size]["en"]) + " " if use_size else "",
      "col": COLOURS[a.colour]["en"] if use_col else "",
      "shp": (SHAPES[a.shape]["en"] if a.count == 1 else SHAPES[a.shape]["en_plural"]) if use_shp
             else _EN_THING[a.count > 1],
      "be": "is" if a.count == 1 else "are",
      "pos": " " + _pick(rng, POSITIONS[a.position]["en"]) if use_pos else "",
      "bg": f" on a {bg} background" if use_bg else "",
      "bgnoun": f"a {bg} background" if use_bg else "a picture",
  }


EN_TEMPLATES: list[str] = [
    "{n} {size}{col} {shp}{pos}{bg}",
    "a photo of {n} {size}{col} {shp}{pos}{bg}",
    "there {be} {n} {size}{col} {shp}{pos}{bg}",
    "{n} {size}{shp} in {col}{pos}{bg}",
    "an image with {n} {size}{col} {shp}{pos}",
    "{bgnoun} with {n} {size}{col} {shp}{pos}",
    "the {nn}{size}{shp}{pos} {be} {col}",
    "a drawing of {n} {size}{col} {shp}{pos}{bg}",
    "you can see {n} {size}{col} {shp}{pos}{bg}",
]
# Two templates end on the colour ("three circles in red", "the square is blue"): without a colour
# they would read "three circles in", so colour-less captions use only the others.
_EN_TEMPLATES_COLOUR_FIRST = [t for t in EN_TEMPLATES if "{col} {shp}" in t]


def _zh_slots(a: Attributes, rng: np.random.Generator, partial: bool = False) -> dict[str, str]:
  use_col, use_shp = _partial(rng, partial)
  use_size = rng.random() < _P_SIZE
  use_pos = a.position is not None and rng.random() < _P_POSITION
  use_bg = rng.random() < _P_BACKGROUND
  pos = POSITIONS[a.position]["zh"] if use_pos else ""
  bg = BACKGROUNDS[a.background]["zh"] if use_bg else ""
  if bg and pos:
    loc = f"{bg}背景的{pos}"
  elif bg:
    loc = f"{bg}背景上"
  elif pos:
    loc = f"画面{pos}"
  else:
    loc = "图中"
  return {
      "n": _ZH_COUNT[a.count],
      "this": _ZH_THIS[a.count],
      "size": _pick(rng, SIZES[a.size]["zh"]) if use_size else "",
      "col": COLOURS[a.colour]["zh"] if use_col else "",
      "shp": SHAPES[a.shape]["zh"] if use_shp else _ZH_THING,
      "loc": loc,
      "where": f"画面{pos}" if pos else "画面中",
      "at_pos": f"，位于{pos}" if pos else "",
      "with_bg": f"，背景为{bg}" if bg else "",
      "on_bg": f"在{bg}背景上" if bg else "画面上",
  }


ZH_TEMPLATES: list[str] = [
    "{loc}有{n}{size}{col}{shp}",
    "{n}{size}{col}{shp}{at_pos}{with_bg}",
    "一张图片，{loc}有{n}{size}{col}{shp}",
    "图中有{n}{col}的{shp}{at_pos}",
    "{this}{size}{shp}是{col}的{with_bg}",
    "这是{n}{size}{col}{shp}{at_pos}{with_bg}",
    "{on_bg}画着{n}{size}{col}{shp}",
    "{n}{size}{col}{shp}出现在{where}",
    "一幅画：{loc}有{n}{col}{shp}",
]


def caption(a: Attributes, lang: str, rng: np.random.Generator,
            partial: bool | tuple[bool, bool] = False) -> str:
  """One caption in `lang`, from a randomly chosen template; `partial` allows one-attribute ones."""
  if lang == "en":
    names = _partial(rng, partial)
    template = _pick(rng, EN_TEMPLATES if names[0] else _EN_TEMPLATES_COLOUR_FIRST)
    text = template.format(**_en_slots(a, rng, names))
    return _fix_articles(re.sub(r"\s+", " ", text).strip())
  if lang == "zh":
    template = _pick(rng, ZH_TEMPLATES)
    text = template.format(**_zh_slots(a, rng, partial))
    # Templates with "是{col}的" / "{n}{col}的" read "是的" / "个的" when the colour is left out.
    return text.replace("是的", "").replace("个的", "个")
  raise ValueError(f"unknown language {lang!r}")


# --------------------------------------------------------------------------- #
# Rendering
# --------------------------------------------------------------------------- #

_SUPERSAMPLE = 4  # Draw at 4x and box-downscale: clean anti-aliased edges at 48 px.


def _unit_polygons() -> dict[str, np.ndarray]:
  """Outlines centred on the origin that fit inside the unit circle, y pointing down."""

  def ring(n: int, radius: float, phase: float) -> np.ndarray:
    t = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)

  star = ring(10, 1.0, -np.pi / 2)
  star[1::2] *= 0.45
  arm = 0.32
  cross = np.array([(-arm, -1), (arm, -1), (arm, -arm), (1, -arm), (1, arm), (arm, arm),
                    (arm, 1), (-arm, 1), (-arm, arm), (-1, arm), (-1, -arm), (-arm, -arm)],
                   dtype=np.float64) * 0.92
  t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
  heart = np.stack([16 * np.sin(t) ** 3,
                    -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))],
                   axis=1)
  heart -= (heart.max(0) + heart.min(0)) / 2
  heart /= np.abs(heart).max()
  # The triangle's circumradius is stretched a little: with its centroid at the
  # centre it otherwise looks much smaller than the other shapes.
  triangle = ring(3, 1.1, -np.pi / 2) + np.array([0.0, 0.12])
  return {
      "circle": ring(48, 0.95, 0.0),
      "square": ring(4, 1.15, np.pi / 4),
      "triangle": triangle,
      "star": star,
      "cross": cross,
      "heart": heart * 0.95,
  }


_POLYGONS = _unit_polygons()
# Objects are drawn like clip art, with a dark outline: the outline's path is the same whatever the
# fill colour, so what a model learns about a shape's contour carries over to colours it never saw
# that shape in. Without it every edge is a colour-specific contrast, and a small ViT learns
# "red square" rather than "square" (held-out combinations stayed near chance on shape).
_OUTLINE_PX, _OUTLINE_RGB = 1.5, (20, 20, 20)
_MAX_ROTATION = math.radians(15)  # Keeps a square a square and a cross a plus sign.


def _radius_fraction(size: int, count: int) -> float:
  # Objects must span several patches: a ViT learns shape from the edge patterns inside its
  # patches, and objects barely larger than one 8-px patch left shape unlearnt in a CPU-sized run.
  if count == 1:
    return (0.28, 0.38)[size]
  return (0.16, 0.21)[size]


def _layout(a: Attributes, s: int, rng: np.random.Generator) -> list[tuple[float, float, float]]:
  """(cx, cy, radius) in output pixels for each object; objects never overlap."""
  base = _radius_fraction(a.size, a.count) * s
  radii = [base * rng.uniform(0.9, 1.1) for _ in range(a.count)]
  margin = 1.0
  if a.position is not None:
    r = radii[0]
    row, col = divmod(a.position, 3)
    span = s - 2 * (r + margin)

    def coord(k: int) -> float:
      return r + margin + span * (k / 2 + rng.uniform(-0.06, 0.06))

    return [(coord(col), coord(row), r)]
  radii_arr = np.array(radii)
  lo, hi = radii_arr + margin, s - radii_arr - margin
  pairs = [(i, j) for i in range(a.count) for j in range(i)]
  for _ in range(20):
    # A batch of candidate layouts per draw: scalar RNG calls dominate otherwise.
    centres = rng.uniform(lo[None, :, None], hi[None, :, None], size=(16, a.count, 2))
    ok = np.ones(16, dtype=bool)
    for i, j in pairs:
      gap = np.linalg.norm(centres[:, i] - centres[:, j], axis=-1)
      ok &= gap > radii[i] + radii[j] + 1.0
    if ok.any():
      first = centres[int(np.argmax(ok))]
      return [(float(x), float(y), r) for (x, y), r in zip(first, radii)]
  # About 1 in 3000 crowded layouts; these fixed spots fit the largest radii.
  spots = [(0.27, 0.27), (0.73, 0.73), (0.73, 0.27)]
  return [(x * s, y * s, r) for (x, y), r in zip(spots, radii)]


@functools.lru_cache(maxsize=8)
def _grid(s: int) -> tuple[np.ndarray, np.ndarray]:
  yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
  yy.flags.writeable = False
  xx.flags.writeable = False
  return yy, xx


def _background(kind: str, s: int, rng: np.random.Generator) -> np.ndarray:
  """A float (s, s, 3) image in muted, nearly grey tones."""
  level = rng.uniform(60, 160)
  tint = rng.uniform(-8, 8, size=3)
  base = np.full((s, s, 3), level) + tint
  yy, xx = _grid(s)
  if kind == "plain":
    return base
  if kind == "gradient":
    angle = rng.uniform(0, 2 * np.pi)
    t = (xx * np.cos(angle) + yy * np.sin(angle)) / s
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6) - 0.5
    return base + rng.uniform(30, 60) * t[..., None]
  if kind == "noise":
    # Luminance-only noise: coloured speckles could read as object colour.
    return base + rng.normal(0, 8, size=(s, s, 1))
  # Faint and coarse: high-contrast stripes a few pixels apart put straight edges in every patch,
  # which a small ViT confuses with the squares' and crosses' edges.
  contrast = rng.uniform(8, 14)
  period = rng.uniform(8, 14) * s / 48
  if kind == "stripes":
    direction = int(rng.integers(3))
    coord = (yy, xx, (xx + yy) / math.sqrt(2))[direction]
    phase = np.floor(coord / period) % 2
  elif kind == "checker":
    phase = (np.floor(xx / period) + np.floor(yy / period)) % 2
  else:
    raise ValueError(f"unknown background {kind!r}")
  return base + contrast * (phase[..., None] - 0.5)


def render(a: Attributes, image_size: int, rng: np.random.Generator,
           fill_grey: float | None = None, with_mask: bool = False):
  """Draws the scene as an RGB image of image_size x image_size pixels.

  `fill_grey` (0-255) fills the objects with that grey instead of their colour. `with_mask`: also
  returns the objects' mask, (image_size, image_size) bool (anti-aliased coverage >= 1/2).
  """
  s = image_size
  bg = _background(BACKGROUNDS[a.background]["name"], s, rng)
  canvas = Image.fromarray(np.clip(np.rint(bg), 0, 255).astype(np.uint8), "RGB")
  mask = Image.new("L", (s * _SUPERSAMPLE, s * _SUPERSAMPLE), 0)
  draw = ImageDraw.Draw(mask)
  edge = Image.new("L", (s * _SUPERSAMPLE, s * _SUPERSAMPLE), 0)
  edge_draw = ImageDraw.Draw(edge)
  edge_width = max(1, round(_OUTLINE_PX * s / 48 * _SUPERSAMPLE))
  outline = _POLYGONS[SHAPES[a.shape]["en"]]
  for cx, cy, r in _layout(a, s, rng):
    theta = rng.uniform(-_MAX_ROTATION, _MAX_ROTATION)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    pts = (outline @ rot.T * r + (cx, cy)) * _SUPERSAMPLE
    draw.polygon([tuple(p) for p in pts.tolist()], fill=255)
    edge_draw.polygon([tuple(p) for p in pts.tolist()], outline=255, width=edge_width)
  mask = mask.reduce(_SUPERSAMPLE)
  edge = edge.reduce(_SUPERSAMPLE)
  # Brightness jitter only: scaling all channels together keeps the hue.
  rgb = np.array(COLOURS[a.colour]["rgb"], dtype=np.float64) * rng.uniform(0.85, 1.05)
  if fill_grey is not None:
    rgb = np.full(3, fill_grey)
  fill = tuple(int(v) for v in np.clip(np.rint(rgb), 0, 255))
  canvas.paste(fill, (0, 0, s, s), mask)
  canvas.paste(_OUTLINE_RGB, (0, 0, s, s), edge)
  if with_mask:
    return canvas, np.maximum(np.asarray(mask), np.asarray(edge)) >= 128
  return canvas


def encode_image(img: Image.Image) -> bytes:
  # JPEG 4:4:4: 3-4x smaller than PNG on the noise/gradient backgrounds, the same
  # decode path as real web data, and no chroma subsampling to smear the
  # colour of a 10-pixel object into its background.
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=90, subsampling=0)
  return buf.getvalue()


# --------------------------------------------------------------------------- #
# Records
# --------------------------------------------------------------------------- #


def class_for(split: str, index: int, rng: np.random.Generator) -> int:
  if split == "train":
    return SEEN[int(rng.integers(len(SEEN)))]
  # Eval splits cycle through their classes so every class has the same count.
  if split == "eval_heldout":
    return HELD_OUT[index % len(HELD_OUT)]
  if split == "eval_seen":
    return SEEN[index % len(SEEN)]
  raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


# Reference captions per language of every evaluation picture (COCO has five per image).
NUM_REFERENCES = 5


def pack_mask(mask: np.ndarray) -> dict[str, Any]:
  """A boolean (h, w) mask as JSON-able data: its shape and its row-major bits, hex-encoded."""
  return {"shape": list(mask.shape), "bits": np.packbits(mask.reshape(-1)).tobytes().hex()}


def unpack_mask(packed: dict[str, Any]) -> np.ndarray:
  h, w = packed["shape"]
  bits = np.unpackbits(np.frombuffer(bytes.fromhex(packed["bits"]), np.uint8))
  return bits[:h * w].reshape(h, w).astype(bool)


def make_example(seed: int, split: str, index: int, image_size: int = 48) -> dict[str, Any]:
  """The record dict (see bigvl.data.formats.records) for one (seed, split, index)."""
  rng = record_rng(seed, split, index)
  attrs = sample_attributes(rng, class_for(split, index, rng))
  meta = attrs.meta()
  if split == "train":
    # One caption per image in a random language, like bilingual web data.
    lang = "zh" if rng.random() < _P_CHINESE else "en"
    names = _partial(rng, True)
    text = caption(attrs, lang, rng, partial=names)
  else:
    captions = {"en": caption(attrs, "en", rng), "zh": caption(attrs, "zh", rng)}
    lang, text = "en", captions["en"]
    meta["captions"] = captions
  monochrome = split == "train" and names == (False, True)
  # Shape-only captions go with black-and-white pictures, as old photos on the web do. Shape then
  # has to be read without colour, and that is what carries over to a colour the shape was never
  # seen in: with colour pictures only, the image tower learns "red, so circle or cross" (colour is
  # a shortcut to shape when each colour is trained with two shapes) and held-out combinations
  # land on the trained shapes of their colour. The objects are filled with any grey, not their
  # colour's own grey level: that still said "dark, so red, blue or brown" (world v9, which also
  # fixed colour-less English captions: held-out top-1, mean of training seeds 0-2, en / zh
  # 0.790 / 0.782 against 0.771 / 0.769 for v8; the lowest of the three rose from 0.69 to 0.75).
  image, objects = render(attrs, image_size, rng,
                         float(rng.uniform(25, 250)) if monochrome else None, with_mask=True)
  if split != "train":
    # What evaluators of generation and of patch selection compare with, drawn after the picture
    # from their own generator (the picture and its captions are those of earlier versions).
    ref_rng = record_rng(seed, split + "/references", index)
    meta["references"] = {lang: [caption(attrs, lang, ref_rng) for _ in range(NUM_REFERENCES)]
                          for lang in ("en", "zh")}
    meta["object_mask"] = pack_mask(objects)
  if monochrome:
    image = image.convert("L").convert("RGB")
    meta["monochrome"] = True
  image = encode_image(image)
  return {
      "id": SPLIT_ID_OFFSET[split] + index,
      "image": image,
      "caption": text,
      "lang": lang,
      "meta": meta,
  }


def corpus(seed: int = 0, num_captions: int = 20000) -> Iterator[str]:
  """Every kind of sentence the tokenizer must know, deterministically.

  Sampled captions over all classes and both languages (attributes only, no
  rendering, so this is fast), then every class name and every filled zero-shot
  template.
  """
  rng = np.random.default_rng([seed, zlib.crc32(b"corpus")])
  for i in range(num_captions):
    attrs = sample_attributes(rng, int(rng.integers(NUM_CLASSES)))
    yield caption(attrs, ("en", "zh")[i % 2], rng, partial=True)
  for c in CLASSES:
    yield c["en"]
    yield c["zh"]
  for lang, templates in ZEROSHOT_TEMPLATES.items():
    for template in templates:
      for k in range(NUM_CLASSES):
        yield format_prompt(template, zeroshot_name(k, lang))


def describe() -> dict[str, Any]:
  """The world's vocabulary and splits as JSON-able data (written as world.json)."""
  return {
      "classes": CLASSES,
      "held_out": HELD_OUT,
      "seen": SEEN,
      "zeroshot_templates": ZEROSHOT_TEMPLATES,
      # Per language, class k's name (or its forms) for zeroshot_templates: what an evaluator
      # fills in, read from world.json so that it never imports this generator.
      "zeroshot_names": {lang: [zeroshot_name(k, lang) for k in range(NUM_CLASSES)]
                         for lang in ZEROSHOT_TEMPLATES},
      "colours": [{k: c[k] for k in ("en", "zh")} | {"rgb": list(c["rgb"])} for c in COLOURS],
      "shapes": SHAPES,
      "backgrounds": BACKGROUNDS,
      "caption_templates": {"en": EN_TEMPLATES, "zh": ZH_TEMPLATES},
      "splits": list(SPLITS),
  }
