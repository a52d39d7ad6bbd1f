"""Prompt templates for zero-shot classification, per language.

Each template has one "{}" for the class name and works with plain `str.format`. M²-Encoder did not
publish its prompts; CLIP-style ensembles of photo-like phrasings are what reproduces its ImageNet
numbers within about a point (see shared/docs/m2_encoder.md). The Chinese set follows the same
pattern in natural Chinese phrasing, with no measure word forced onto the class name ("一张{}的照片"
reads correctly for any noun).
"""

from __future__ import annotations

import json
import os
import string

CLIP_EN: list[str] = [
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a low resolution photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a close-up photo of a {}.",
    "a cropped photo of the {}.",
    "a blurry photo of the {}.",
    "a good photo of the {}.",
    "a photo of one {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a rendering of a {}.",
    "a drawing of a {}.",
    "a painting of the {}.",
    "a sculpture of a {}.",
    "a toy {}.",
    "art of the {}.",
    "itap of a {}.",
]

CLIP_ZH: list[str] = [
    "一张{}的照片。",
    "一张模糊的{}的照片。",
    "一张清晰的{}的照片。",
    "一张昏暗的{}的照片。",
    "一张明亮的{}的照片。",
    "一张{}的特写照片。",
    "一张裁剪过的{}的照片。",
    "一张低分辨率的{}的照片。",
    "一张大{}的照片。",
    "一张小{}的照片。",
    "很多{}的照片。",
    "{}的图片。",
    "一幅{}的画。",
    "一幅{}的素描。",
    "{}的渲染图。",
    "{}的雕塑。",
    "一个{}玩具。",
    "这是一张{}的照片。",
    "图中是{}。",
    "{}的艺术作品。",
]

# One plain prompt per language: the cheap baseline, and what a quick look in a notebook uses.
SIMPLE_EN: list[str] = ["a photo of a {}."]
SIMPLE_ZH: list[str] = ["一张{}的照片。"]

NAMED: dict[str, dict[str, list[str]]] = {
    "clip": {"en": CLIP_EN, "zh": CLIP_ZH},
    "simple": {"en": SIMPLE_EN, "zh": SIMPLE_ZH},
}


def load(spec: str) -> dict[str, list[str]]:
  """Templates by name ("clip", "simple") or from a JSON file `{"en": [...], "zh": [...]}`."""
  if spec in NAMED:
    return {lang: list(t) for lang, t in NAMED[spec].items()}
  if not os.path.isfile(spec):
    raise ValueError(f"templates={spec!r}: use one of {sorted(NAMED)} or a JSON file "
                     '{"en": [...], "zh": [...]}')
  with open(spec, encoding="utf-8") as f:
    table = json.load(f)
  if not isinstance(table, dict) or not all(
      isinstance(v, list) and v and all(isinstance(t, str) for t in v) for v in table.values()):
    raise ValueError(f"{spec}: expected a JSON object of language -> non-empty list of templates")
  for lang, ts in table.items():
    for t in ts:
      if len(fields(t)) != 1:
        raise ValueError(f"{spec}: template {t!r} ({lang}) needs exactly one '{{}}' (or one named "
                         "form of the class name, such as '{plural}')")
  return table


def fields(template: str) -> list[str]:
  """The class-name fields of a template: "" for "{}", else the form's name ("plural")."""
  try:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
  except ValueError as e:
    raise ValueError(f"template {template!r}: {e}") from None
