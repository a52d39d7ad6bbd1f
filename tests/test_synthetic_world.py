"""The synthetic world: determinism, held-out discipline, class material, pixels."""

import io
import re

import numpy as np
import pytest
from PIL import Image

from bigvl.data.formats.records import decode_record, encode_record
from bigvl.evaluators import templates as templates_lib
from data_pipelines import synthetic_world as w


def test_same_seed_same_bytes_and_other_seed_differs():
  for split in w.SPLITS:
    for i in (0, 7, 1234):
      a = encode_record(w.make_example(3, split, i))
      assert a == encode_record(w.make_example(3, split, i))
      assert a != encode_record(w.make_example(4, split, i))


def test_records_do_not_depend_on_generation_order():
  forward = [w.make_example(0, "train", i) for i in range(20)]
  backward = [w.make_example(0, "train", i) for i in reversed(range(20))][::-1]
  assert forward == backward


def test_class_material():
  n = w.NUM_COLOURS * w.NUM_SHAPES
  assert n >= 20 and len(w.CLASSES) == n
  assert [c["index"] for c in w.CLASSES] == list(range(n))
  assert len({c["en"] for c in w.CLASSES}) == n
  assert len({c["zh"] for c in w.CLASSES}) == n
  assert all(re.search(r"[\u4e00-\u9fff]", c["zh"]) for c in w.CLASSES)
  # Each colour held out with exactly two shapes; each shape held out with as many colours as it
  # is seen with, so zero-shot among the held-out classes needs both colour and shape.
  assert len(w.HELD_OUT) == 2 * w.NUM_COLOURS >= 20
  assert np.bincount([k // w.NUM_SHAPES for k in w.HELD_OUT]).tolist() == [2] * w.NUM_COLOURS
  per_shape = np.bincount([k % w.NUM_SHAPES for k in w.HELD_OUT], minlength=w.NUM_SHAPES)
  assert per_shape.min() == per_shape.max() == 2 * w.NUM_COLOURS // w.NUM_SHAPES
  assert sorted(w.SEEN + w.HELD_OUT) == list(range(n))
  for lang in ("en", "zh"):
    templates = w.ZEROSHOT_TEMPLATES[lang]
    assert len(templates) >= 5
    # One class name per prompt: "{}", or in English "{plural}" for the counted prompts.
    assert all(templates_lib.fields(t) in ([""], ["plural"]) for t in templates)
    # Pictures hold one to three objects: the ensemble names every count in both languages.
    counts = (("one", "two", "three") if lang == "en" else ("一个", "两个", "三个"))
    assert all(any(n in t for t in templates) for n in counts)
  assert len(w.EN_TEMPLATES) >= 8 and len(w.ZH_TEMPLATES) >= 8


def test_held_out_classes_never_in_train():
  for i in range(3000):
    rng = w.record_rng(0, "train", i)
    assert w.class_for("train", i, rng) not in w.HELD_OUT
  heldout = [w.make_example(0, "eval_heldout", i)["meta"] for i in range(len(w.HELD_OUT))]
  assert {m["class"] for m in heldout} == set(w.HELD_OUT)
  assert all(m["held_out"] for m in heldout)
  seen = [w.make_example(0, "eval_seen", i)["meta"] for i in range(len(w.SEEN))]
  assert {m["class"] for m in seen} == set(w.SEEN)
  assert not any(m["held_out"] for m in seen)


def _mentions(text: str, lang: str, meta: dict) -> tuple[bool, bool]:
  """(names the colour, names the shape — in the right number when English)."""
  cls = w.CLASSES[meta["class"]]
  colour = w.COLOURS[meta["class"] // w.NUM_SHAPES][lang]
  shape = w.SHAPES[meta["class"] % w.NUM_SHAPES]
  if lang == "zh":
    return colour in text, shape["zh"] in text
  words = re.findall(r"[a-z]+", text)
  name = shape["en"] if meta["count"] == 1 else shape["en_plural"]
  return cls["colour"] in words, name in words


def test_captions_mention_colour_and_shape_with_right_plurals():
  langs, kinds = set(), set()
  for i in range(400):
    ex = w.make_example(1, "train", i)
    langs.add(ex["lang"])
    has = _mentions(ex["caption"], ex["lang"], ex["meta"])
    kinds.add(has)
    # Training captions name at least one of the two; a partial one names the other generically.
    assert any(has), ex["caption"]
    if not has[1]:
      generic = {"en": ("shape" if ex["meta"]["count"] == 1 else "shapes"), "zh": "图形"}
      assert generic[ex["lang"]] in ex["caption"], ex["caption"]
    if ex["lang"] == "en":
      assert not re.search(r"\ba [aeiou]", ex["caption"]), ex["caption"]
      assert "  " not in ex["caption"], ex["caption"]
  assert langs == {"en", "zh"}
  assert kinds == {(True, True), (True, False), (False, True)}
  for i in range(50):
    ex = w.make_example(1, "eval_heldout", i)
    assert ex["lang"] == "en" and ex["caption"] == ex["meta"]["captions"]["en"]
    for lang in ("en", "zh"):
      assert _mentions(ex["meta"]["captions"][lang], lang, ex["meta"]) == (True, True)


def test_captions_without_a_colour_read_whole():
  # "three circles in" / "the two triangles are": templates that end on the colour must not be
  # used for captions that leave it out.
  a = w.Attributes(colour=0, shape=2, count=2, size=0, position=None, background=0)
  rng = np.random.default_rng(0)
  for _ in range(300):
    for names in ((False, True), (True, True), (True, False)):
      for lang in ("en", "zh"):
        text = w.caption(a, lang, rng, partial=names)
        assert not re.search(r"\b(in|is|are|with|of)$", text), (names, text)
        assert not text.endswith(("是", "，")) and "是的" not in text, (names, text)
        assert ("red" in text or "红色" in text) == names[0], (names, text)


def test_monochrome_pictures_do_not_betray_the_colour():
  # Shape-only captions come with black-and-white pictures whose objects take any grey: a grey
  # that followed the colour's own luminance would still point to the colour, and so to the shapes
  # that colour was trained with.
  def luminance(rgb):
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]

  own, drawn = [], []
  for i in range(3000):
    ex = w.make_example(0, "train", i)
    m = ex["meta"]
    if not m.get("monochrome") or m["position"] != "in the centre" or m["size"] != "large":
      continue
    img = np.asarray(Image.open(io.BytesIO(ex["image"])).convert("RGB"), dtype=np.float64)
    assert np.abs(img[..., 0] - img[..., 1]).max() <= 3  # grey
    centre = img[20:28, 20:28].mean()
    own.append(luminance(w.COLOURS[m["class"] // w.NUM_SHAPES]["rgb"]))
    drawn.append(centre)
  assert len(own) >= 20
  assert abs(np.corrcoef(own, drawn)[0, 1]) < 0.5, np.corrcoef(own, drawn)[0, 1]
  assert np.ptp(drawn) > 150


def test_caption_templates_are_varied():
  texts = {w.make_example(0, "eval_seen", i)["meta"]["captions"]["en"] for i in range(300)}
  openings = {" ".join(t.split()[:2]) for t in texts}
  assert len(openings) >= 8


@pytest.mark.parametrize("image_size", [48, 64])
def test_images_decode_and_show_the_object_colour(image_size):
  palette = np.array([c["rgb"] for c in w.COLOURS], dtype=np.float64)
  for i in range(60):
    ex = w.make_example(0, "train", i, image_size=image_size)
    img = Image.open(io.BytesIO(ex["image"]))
    assert img.size == (image_size, image_size) and img.mode == "RGB"
    px = np.asarray(img, dtype=np.float64).reshape(-1, 3)
    if ex["meta"].get("monochrome"):
      # Shape-only captions come with black-and-white pictures (JPEG leaves the channels ±2).
      assert not re.search(w.COLOURS[ex["meta"]["class"] // w.NUM_SHAPES]["en"], ex["caption"])
      assert np.abs(px - px.mean(1, keepdims=True)).max() <= 3, ex["meta"]
      continue
    # A pixel shows colour k when it is k at some brightness in the renderer's jitter range.
    k = np.clip(px @ palette.T / (palette ** 2).sum(1), 0.85, 1.05)           # (pixels, colours)
    dist = np.linalg.norm(px[:, None, :] - k[..., None] * palette[None], axis=-1)
    counts = np.bincount(dist.argmin(1)[dist.min(1) < 20], minlength=len(palette))
    colour = ex["meta"]["class"] // w.NUM_SHAPES
    assert counts[colour] >= 20 and counts.argmax() == colour, (i, ex["meta"], counts)


def test_record_round_trip_and_ids():
  ex = w.make_example(0, "eval_seen", 5)
  assert ex["id"] == w.SPLIT_ID_OFFSET["eval_seen"] + 5
  back = decode_record(encode_record(ex))
  assert back["meta"]["captions"] == ex["meta"]["captions"]
  assert back["image"] == ex["image"]


def test_corpus_is_deterministic_and_covers_captions():
  a = list(w.corpus(0, num_captions=500))
  assert a == list(w.corpus(0, num_captions=500))
  text = "".join(a)
  for c in w.CLASSES:
    assert c["en"] in a and c["zh"] in a
  for lang, templates in w.ZEROSHOT_TEMPLATES.items():
    assert templates[0].format(w.CLASSES[0][lang]) in a
  caption_chars = set("".join(w.make_example(2, "train", i)["caption"] for i in range(300)))
  assert caption_chars <= set(text)


def test_world_json_names_the_zero_shot_classes(tiny_world):
  # What the evaluators read instead of importing this package.
  import json
  import os
  with open(os.path.join(tiny_world, "world.json"), encoding="utf-8") as f:
    world = json.load(f)
  assert world["zeroshot_templates"] == w.ZEROSHOT_TEMPLATES
  assert world["zeroshot_names"] == {lang: [w.zeroshot_name(k, lang) for k in range(w.NUM_CLASSES)]
                                     for lang in ("en", "zh")}
  assert len(world["classes"]) == w.NUM_CLASSES
  assert world["params"]["version"] >= 10
