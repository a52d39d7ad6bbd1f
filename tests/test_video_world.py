"""The video world: deterministic clips, held-out compositions kept out of training and in every
eval clip, mirrored eval pairs that are time reverses with mirrored captions, objects that move in
the pixels as said, consistent event times, and the builder's shards, tokenizer and reuse."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from bigvl.data.formats.records import decode_record, encode_record
from data_pipelines import build_videos, shard_writer
from data_pipelines import synthetic_world as sw
from data_pipelines import video_world as vw


def _frames(record) -> np.ndarray:
  return np.stack([np.asarray(Image.open(io.BytesIO(f)).convert("RGB")) for f in record["frames"]])


def test_records_are_a_function_of_seed_split_index():
  for split in vw.SPLITS:
    a = encode_record(vw.make_clip(0, split, 5))
    assert a == encode_record(vw.make_clip(0, split, 5))
    assert a != encode_record(vw.make_clip(1, split, 5))
  big = vw.make_clip(0, "train", 5, frame_size=48)
  assert _frames(big).shape == (8, 48, 48, 3)
  ids = {vw.make_clip(0, s, i)["id"] for s in vw.SPLITS for i in range(3)}
  assert len(ids) == 9


def test_held_out_compositions_only_in_eval():
  for i in range(200):
    assert vw.make_clip(0, "train", i)["meta"]["composition"] == ""
    assert vw.make_clip(0, "eval_seen", i)["meta"]["composition"] == ""
    key = vw.make_clip(0, "eval", i)["meta"]["composition"]
    assert key and all(k in vw.describe()["held_out"]["keys"] for k in key.split("|"))
  # Every shape and every action is still trained, and each held-out order's reverse is.
  pairs, orders = set(), set()
  for i in range(600):
    clip = vw.clip_for(0, "train", i)
    pairs |= {(clip.objects[e.obj].cls % sw.NUM_SHAPES, e.action) for e in clip.events}
    orders.add(tuple(e.kind for e in clip.events))
    assert all(clip.objects[e.obj].cls in sw.SEEN for e in clip.events)
  assert {s for s, _ in pairs} == set(range(sw.NUM_SHAPES)) and {a for _, a in pairs} == set(
      vw.ACTIONS)
  assert not pairs & {(s, a) for a, s in vw.HELD_OUT_SHAPE.items()}
  assert all((b, a) in orders and (a, b) not in orders for a, b in vw.HELD_OUT_ORDERS)


_EN_SWAP = {"left": "right", "right": "left", "up": "down", "down": "up",
            "appears": "disappears", "disappears": "appears", "shows up": "goes away",
            "goes away": "shows up"}
_EN_SWAP_RE = re.compile("|".join(sorted(map(re.escape, _EN_SWAP), key=len, reverse=True)))


def _mirror_en(text: str) -> str:
  """An English caption without colour changes or pronouns, played backwards."""
  prefix = "in the video, " if text.startswith("in the video, ") else ""
  text = text[len(prefix):]
  static = re.search(r", (while [^,]* stays still|and [^,]* does not move)$", text)
  suffix = static.group(0) if static else ""
  text = text[:len(text) - len(suffix)]
  m = re.fullmatch(r"(first )?(.*?)(, and then |, then )(.*)", text)
  swap = lambda t: _EN_SWAP_RE.sub(lambda w: _EN_SWAP[w.group(0)], t)
  body = swap(text) if m is None else (m.group(1) or "") + swap(m.group(4)) + m.group(3) + swap(
      m.group(2))
  return prefix + body + suffix


def test_mirrored_eval_pairs_are_time_reverses():
  checked = 0
  for split in ("eval", "eval_seen"):
    for k in range(30):
      a, b = vw.make_clip(0, split, 2 * k), vw.make_clip(0, split, 2 * k + 1)
      fa, fb = _frames(a).astype(int), _frames(b).astype(int)
      assert np.abs(fa[::-1] - fb).mean() < 1.0
      assert np.abs(fa - fb).mean() > 0.5   # not a still picture
      ea, eb = a["meta"]["events"], b["meta"]["events"][::-1]
      for x, y in zip(ea, eb):
        assert vw.MIRROR_ACTION[x["action"]] == y["action"]
        assert (y["start_frame"], y["end_frame"]) == (7 - x["end_frame"], 7 - x["start_frame"])
        assert (x.get("from_colour"), x.get("to_colour")) == (y.get("to_colour"),
                                                              y.get("from_colour"))
      assert a["meta"]["scene"]["activity"] == b["meta"]["scene"]["activity"]
      same_object = len(ea) == 2 and ea[0]["object_index"] == ea[1]["object_index"]
      if any(e["kind"] == "colour" for e in ea) or same_object:
        continue
      for ca, cb in zip(a["meta"]["captions_by_lang"]["en"], b["meta"]["captions_by_lang"]["en"]):
        assert _mirror_en(ca) == cb, (ca, cb)
        checked += 1
  assert checked > 40


def _centroid(frame: np.ndarray, rgb: np.ndarray) -> np.ndarray | None:
  """The median position of the pixels of colour `rgb` (a median: another object's outline
  blends into some colour at a pixel or two)."""
  near = np.linalg.norm(frame.astype(float) - rgb, axis=-1) < 40
  if near.sum() < 4:
    return None
  ys, xs = np.nonzero(near)
  return np.array([np.median(xs), np.median(ys)])


def test_objects_move_and_appear_in_the_pixels_as_said():
  size, moved, appeared = 32, 0, 0
  for i in range(150):
    clip = vw.clip_for(0, "train", i)
    if len(clip.events) != 1:
      continue
    ev, obj = clip.events[0], clip.objects[clip.events[0].obj]
    colour = obj.cls // sw.NUM_SHAPES
    if sum(o.cls // sw.NUM_SHAPES == colour for o in clip.objects) > 1 or ev.kind == "colour":
      continue
    frames = _frames(vw.make_clip(0, "train", i, frame_size=size))
    rgb = np.array(sw.COLOURS[colour]["rgb"]) * obj.brightness
    first, last = _centroid(frames[0], rgb), _centroid(frames[-1], rgb)
    if ev.kind == "move":
      dx, dy = last - first
      along = {"left": -dx, "right": dx, "up": -dy, "down": dy}[ev.direction]
      across = abs(dy) if ev.direction in ("left", "right") else abs(dx)
      assert along > 0.3 * size and across < 2, (i, ev, dx, dy)
      moved += 1
    else:
      there, absent = (first, last) if ev.kind == "disappear" else (last, first)
      assert there is not None and absent is None, (i, ev)
      appeared += 1
  assert moved >= 5 and appeared >= 5


def test_event_times_follow_frame_times():
  for split in vw.SPLITS:
    for i in range(40):
      rec = vw.make_clip(0, split, i, num_frames=8, fps=5)
      times = rec["frame_times"]
      assert times == [k / 5 for k in range(8)]
      events = rec["meta"]["events"]
      for e in events:
        assert 0 <= e["start_frame"] < e["end_frame"] < 8
        assert (e["start_time"], e["end_time"]) == (times[e["start_frame"]],
                                                    times[e["end_frame"]])
      if len(events) == 2:
        assert events[0]["end_frame"] <= 3 < 4 <= events[1]["start_frame"]
      for q in rec["meta"]["qa"]:
        if q["format"] == "choice":
          assert 0 <= q["answer"] < len(q["choices"]["en"]) == len(q["choices"]["zh"])
      assert rec["caption"] in rec["meta"]["captions"]
  with pytest.raises(ValueError, match="num_frames"):
    vw.make_clip(0, "train", 0, num_frames=3)


def test_tiny_build_writes_everything_once(tmp_path):
  out = tmp_path / "videos"
  kw = dict(num_train=6, num_eval=4, num_shards=2, vocab_size=160, num_corpus_clips=150,
            num_workers=1)
  m = build_videos.build(out, **kw)
  assert {k: v["num_records"] for k, v in m["splits"].items()} == {
      "train": 6, "eval": 4, "eval_seen": 4}
  stamp = (out / "tokenizer.model").stat().st_mtime_ns
  assert build_videos.build(out, **kw) == m
  assert (out / "tokenizer.model").stat().st_mtime_ns == stamp
  meta = json.loads((out / "videos.json").read_text())
  assert meta["params"]["num_frames"] == 8 and meta["held_out"]["orders"]
  for split, entry in m["splits"].items():
    for shard in entry["shards"]:
      for data in shard_writer.read_records(out / shard["file"]):
        rec = decode_record(data)
        assert len(rec["frames"]) == len(rec["frame_times"]) == 8
        assert _frames(rec).shape == (8, 32, 32, 3)
  from bigvl.tokenizers.glm import GLMTokenizer
  tok = GLMTokenizer(str(out / "tokenizer.model"))
  ids, mask = tok.encode(vw.make_clip(0, "eval", 0)["meta"]["captions_by_lang"]["zh"][0])
  assert mask.sum() > 5 and tok.unk_id not in ids[mask > 0]
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "mine.txt").write_text("x")
  with pytest.raises(FileExistsError):
    build_videos.build(foreign, **kw)
  with pytest.raises(ValueError, match="num_eval"):
    build_videos.build(tmp_path / "odd", **(kw | {"num_eval": 3}))
