"""The scene world: deterministic records, the held-out splits kept apart from training, boxes that
hold their objects, questions that are answerable and answered right, and the builder's reuse."""

import io

import numpy as np
from PIL import Image

from data_pipelines import build_scenes, scene_world as sw
from data_pipelines import synthetic_world as world


def _classes(rec):
  return [o["class"] for o in rec["meta"]["objects"]]


def test_records_are_a_function_of_seed_split_index():
  a, b = sw.make_scene(0, "train", 7), sw.make_scene(0, "train", 7)
  assert a == b and a != sw.make_scene(1, "train", 7)


def test_the_held_out_splits_never_reach_training():
  for i in range(400):
    cl = _classes(sw.make_scene(0, "train", i))
    assert len(set(cl)) == len(cl) and all(k in world.SEEN for k in cl)
    assert not any(frozenset((a, b)) in sw.HELD_OUT_PAIRS for a in cl for b in cl if a != b)
  for i in range(100):
    rec = sw.make_scene(0, "eval", i)
    assert _classes(rec)[rec["meta"]["target"]] in world.HELD_OUT
    rec = sw.make_scene(0, "eval_pairs", i)
    cl, t = _classes(rec), _classes(rec)[rec["meta"]["target"]]
    assert all(k in world.SEEN for k in cl)
    assert any(frozenset((t, k)) in sw.HELD_OUT_PAIRS for k in cl)


def test_boxes_hold_their_objects_and_questions_are_right():
  rng = np.random.default_rng(0)
  image, boxes, labels = sw.render_scene([0, 5, 10], 48, rng)
  for k, (x0, y0, x1, y1) in enumerate(boxes):
    ys, xs = np.nonzero(labels == k + 1)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
  for i in range(200):
    m = sw.make_scene(0, "eval_pairs", i)["meta"]
    cl = _classes({"meta": m})
    col, shp = divmod(cl[m["target"]], world.NUM_SHAPES)
    for q in m["questions"]:
      assert q["answer"] in sw.ANSWERS
      if q["type"] == "colour":
        assert q["answer"] == world.COLOURS[col]["en"]
        assert [k % world.NUM_SHAPES for k in cl].count(shp) == 1
        assert world.SHAPES[shp]["en"] in q["en"]
      elif q["type"] == "shape":
        assert q["answer"] == world.SHAPES[shp]["en"]
        assert [k // world.NUM_SHAPES for k in cl].count(col) == 1
      else:
        present = q["answer"] == "yes"
        named = [k for k in range(world.NUM_CLASSES) if world.CLASSES[k]["en"] in q["en"]
                 and world.COLOURS[k // 4]["zh"] in q["zh"] and world.SHAPES[k % 4]["zh"] in q["zh"]]
        assert len(named) == 1 and (named[0] in cl) == present
    assert m["near_miss"]["en"] != m["captions"]["en"]


def test_the_builder_writes_every_split_once(tmp_path):
  out = tmp_path / "scenes"
  m = build_scenes.build(out, num_train=12, num_eval=6, num_shards=2, num_workers=1)
  assert {k: v["num_records"] for k, v in m["splits"].items()} == {
      "train": 12, "eval": 6, "eval_pairs": 6}
  assert build_scenes.build(out, num_train=12, num_eval=6, num_shards=2, num_workers=1) == m
  from bigvl.evaluators import sources
  data, metas = sources.scenes(str(out), "eval_pairs", 48)
  assert len(data) == 6 and data.images.load(np.arange(2))["image"].shape == (2, 48, 48, 3)
  assert sources.scenes_meta(str(out))["held_out_pairs"]
  Image.open(io.BytesIO(sw.make_scene(0, "eval", 0)["image"])).verify()
