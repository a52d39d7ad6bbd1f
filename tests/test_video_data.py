"""Real video data: decoding sampled frames (bigvl.data.video_decode), converting video JSON lines
and the MSR-VTT layout into video-record shards (launch/build_shards.py), and the evaluation
readers (bigvl.evaluators.video_sources). The videos are tiny MP4s made here."""

import fractions
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

av = pytest.importorskip("av")

from bigvl.data import video_decode  # noqa: E402
from bigvl.data.formats import records  # noqa: E402
from bigvl.evaluators import video_sources  # noqa: E402
from data_pipelines import jsonl_to_shards, shard_writer, video_to_shards  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
W, H, STEP = 48, 32, 2   # frame size; the bright bar moves STEP px right per frame


def _bar(i: int, colour: int = 255) -> np.ndarray:
  a = np.zeros((H, W, 3), np.uint8)
  a[:, STEP * i:STEP * i + 8] = colour
  return a


def make_mp4(path: Path, num_frames: int = 16, fps: int = 12, pts_ms=None, colour=255) -> Path:
  """A bar moving right; frame i at i / fps s, or at pts_ms[i] milliseconds (variable rate)."""
  with av.open(str(path), "w") as c:
    s = c.add_stream("mpeg4", rate=fps)
    s.width, s.height, s.pix_fmt = W, H, "yuv420p"
    if pts_ms is not None:
      s.codec_context.time_base = fractions.Fraction(1, 1000)
    for i in range(num_frames if pts_ms is None else len(pts_ms)):
      frame = av.VideoFrame.from_ndarray(_bar(i, colour), format="rgb24")
      if pts_ms is not None:
        frame.pts, frame.time_base = pts_ms[i], fractions.Fraction(1, 1000)
      for p in s.encode(frame):
        c.mux(p)
    for p in s.encode():
      c.mux(p)
  return path


def _bar_index(frame: np.ndarray) -> float:
  """Which frame of `_bar` a decoded frame shows (from the bar's left edge)."""
  cols = frame.mean(axis=(0, 2)) > 128
  return np.argmax(cols) / STEP


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
  d = tmp_path_factory.mktemp("videos")
  make_mp4(d / "a.mp4")                              # 16 frames, 12 fps: 1.33 s
  make_mp4(d / "b.mp4", num_frames=20, fps=10, colour=200)
  make_mp4(d / "short.mp4", num_frames=3)
  make_mp4(d / "vfr.mp4", pts_ms=[0, 40, 80, 120, 1000, 1040, 1080, 2000])
  (d / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
  (d / "cut.mp4").write_bytes((d / "a.mp4").read_bytes()[:300])   # truncated download
  with av.open(str(d / "audio.mp4"), "w") as c:                   # no video stream
    s = c.add_stream("aac", rate=8000)
    f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
    f.sample_rate, f.pts = 8000, 0
    for p in list(s.encode(f)) + list(s.encode()):
      c.mux(p)
  return d


# ---------------------------------------------------------------------------- decoding
def test_sample_times_uniform_centres_and_fps():
  np.testing.assert_allclose(video_decode.sample_times(2.0, 4), [0.25, 0.75, 1.25, 1.75])
  np.testing.assert_allclose(video_decode.sample_times(2.0, 8, fps=2), [0, 0.5, 1.0, 1.5])
  np.testing.assert_allclose(video_decode.sample_times(10.0, 3, fps=1), [0, 1, 2])  # the first 3


def test_decode_samples_segment_centres_and_shows_the_motion(videos):
  frames, times = video_decode.decode(videos / "a.mp4", 4)
  assert frames.dtype == np.uint8 and frames.shape == (4, H, W, 3)
  # Centres of 4 segments of 16 frames: frames floor((i + 0.5) * 4) = 2, 6, 10, 14.
  np.testing.assert_allclose(times, np.array([2, 6, 10, 14]) / 12, atol=1e-6)
  np.testing.assert_allclose([_bar_index(f) for f in frames], [2, 6, 10, 14], atol=0.5)
  assert np.allclose(np.diff(times), 4 / 12)      # uniform
  # 8 of 16: every other frame; at 4 fps: every third frame from the start, at most num_frames.
  _, times = video_decode.decode(videos / "a.mp4", 8)
  np.testing.assert_allclose(times * 12, np.arange(1, 16, 2), atol=1e-6)
  frames, times = video_decode.decode(videos / "a.mp4", 5, fps=4)
  np.testing.assert_allclose(times * 12, [0, 3, 6, 9, 12], atol=1e-6)
  np.testing.assert_allclose([_bar_index(f) for f in frames], [0, 3, 6, 9, 12], atol=0.5)


def test_decode_resizes_crops_cuts_clips_and_reads_bytes(videos):
  frames, _ = video_decode.decode(videos / "a.mp4", 2, size=16)
  assert frames.shape == (2, 16, 16, 3)           # 32x48 -> 16x24 -> centre 16x16
  # The clip [0.5, 1.0) s holds frames 6..11; its 3 segment centres show frames 7, 9, 11.
  frames, times = video_decode.decode(videos / "a.mp4", 3, start=0.5, end=1.0)
  np.testing.assert_allclose(times * 12, [7, 9, 11], atol=1e-6)
  np.testing.assert_allclose([_bar_index(f) for f in frames], [7, 9, 11], atol=0.5)
  data = (videos / "a.mp4").read_bytes()
  from_bytes, _ = video_decode.decode(data, 4)
  np.testing.assert_array_equal(from_bytes, video_decode.decode(videos / "a.mp4", 4)[0])


def test_variable_frame_rate_samples_by_timestamp(videos):
  """Frames at 0, .04, .08, .12, 1.0, 1.04, 1.08, 2.0 s: the segment centres (.26, .77, 1.28,
  1.79 s) show frames 3, 3, 6, 6; kept distinct and in order: 3, 4, 6, 7 (frame indices would
  give 1, 3, 5, 7)."""
  frames, times = video_decode.decode(videos / "vfr.mp4", 4)
  np.testing.assert_allclose(times, [0.12, 1.0, 1.08, 2.0], atol=1e-6)
  assert np.all(np.diff(times) > 0)
  np.testing.assert_allclose([_bar_index(f) for f in frames], [3, 4, 6, 7], atol=0.5)


def test_bad_videos_raise_one_line_errors_naming_them(videos):
  cases = {"corrupt.mp4": "undecodable video", "cut.mp4": "undecodable video",
           "audio.mp4": "no video stream", "missing.mp4": "missing file"}
  for name, reason in cases.items():
    with pytest.raises(video_decode.VideoError) as e:
      video_decode.decode(videos / name, 4)
    assert e.value.reason == reason and str(videos / name) in str(e.value)
    assert "\n" not in str(e.value)
  # Too short: fewer distinct frames than min_frames (default num_frames).
  with pytest.raises(video_decode.VideoError, match=r"too short: .*short.mp4: 3 frame.*needs 4"):
    video_decode.decode(videos / "short.mp4", 4)
  frames, _ = video_decode.decode(videos / "short.mp4", 4, min_frames=2)
  assert len(frames) == 3                          # all it has; the reader pads
  with pytest.raises(video_decode.VideoError, match="too short"):
    video_decode.decode(videos / "a.mp4", 8, fps=1)  # 1.33 s at 1 fps: 2 sampling times


# ---------------------------------------------------------------------------- shards
def _records(out: Path, split: str = "train") -> dict[int, dict]:
  manifest = shard_writer.read_manifest(out)
  return {r["id"]: r for s in manifest["splits"][split]["shards"]
          for r in shard_writer.read_shard(out / s["file"])}


@pytest.fixture(scope="module")
def clips_jsonl(videos) -> Path:
  lines = [{"video": "a.mp4", "caption": ["a bar moves right", "一条白线向右移动"]},
           {"video": "b.mp4", "caption": "a grey bar", "start": 0.5},
           {"video": "short.mp4", "caption": "too short"},
           {"video": "corrupt.mp4", "caption": "broken"},
           {"video": "missing.mp4", "caption": "gone"},
           {"video": "a.mp4", "caption": "   "}]
  path = videos / "clips.jsonl"
  path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\nnot json\n",
                  encoding="utf-8")
  return path


def test_video_jsonl_becomes_video_records_and_bad_videos_are_named(clips_jsonl, tmp_path):
  out = tmp_path / "out"
  summary = video_to_shards.convert(clips_jsonl, out, input_format="video_jsonl", frames=4,
                                    frame_size=16, num_shards=2, num_workers=1)
  assert summary["written"] == 2 and summary["skipped"] == 5
  assert summary["skipped_by_reason"] == {"too short": 1, "undecodable video": 1,
                                          "missing file": 1, "empty caption": 1,
                                          "malformed json line": 1}
  named = {e.get("video"): e["reason"] for e in summary["skipped_examples"]}
  assert "short.mp4" in named["short.mp4"] and "corrupt.mp4" in named["corrupt.mp4"]
  assert "videos_per_s" in summary and "images_per_s" not in summary
  recs = _records(out)
  a = records.decode_record(records.encode_record(recs[1]))
  assert records.is_video(a) and len(a["frames"]) == 4
  pixels = [np.asarray(Image.open(io.BytesIO(f))) for f in a["frames"]]
  assert all(p.shape == (16, 16, 3) and Image.open(io.BytesIO(f)).format == "JPEG"
             for p, f in zip(pixels, a["frames"]))
  np.testing.assert_allclose(a["frame_times"], np.array([2, 6, 10, 14]) / 12, atol=1e-5)
  assert a["caption"] == "a bar moves right" and a["lang"] == "en"
  assert a["meta"]["captions"] == ["a bar moves right", "一条白线向右移动"]
  assert a["meta"]["langs"] == ["en", "zh"] and a["meta"]["video"] == "a.mp4"
  # From 0.5 s of the 2 s, 10 fps video: [0.5, 2.0)'s centres .69, 1.06, 1.44, 1.81 s show:
  np.testing.assert_allclose(recs[2]["frame_times"], [0.6, 1.0, 1.4, 1.8], atol=1e-5)
  again = video_to_shards.convert(clips_jsonl, out, input_format="video_jsonl", frames=4,
                                  frame_size=16, num_shards=2, num_workers=1)
  assert again["reused"] and again["written"] == 2


def test_worker_processes_write_the_same_shards(videos, tmp_path):
  path = tmp_path / "many.jsonl"
  path.write_text("".join(json.dumps({"video": str(videos / v), "caption": f"clip {i}"}) + "\n"
                          for i, v in enumerate(["a.mp4", "b.mp4", "short.mp4"] * 4)))
  digests = []
  for workers in (1, 2):
    out = tmp_path / f"w{workers}"
    summary = video_to_shards.convert(path, out, input_format="video_jsonl", frames=4,
                                      frame_size=8, num_shards=2, num_workers=workers)
    assert summary["written"] == 8 and summary["skipped_by_reason"] == {"too short": 4}
    digests.append(shard_writer.read_manifest(out)["splits"]["train"]["digest"])
  assert digests[0] == digests[1]


def _msrvtt(root: Path, videos: Path) -> Path:
  (root / "videos" / "all").mkdir(parents=True)
  for vid, src in (("video0", "a.mp4"), ("video1", "b.mp4"), ("video2", "a.mp4"),
                   ("video4", "corrupt.mp4")):
    (root / "videos" / "all" / f"{vid}.mp4").write_bytes((videos / src).read_bytes())
  train_val = {
      "videos": [{"video_id": "video0", "split": "train", "category": 1},
                 {"video_id": "video1", "split": "train", "category": 2},
                 {"video_id": "video3", "split": "train", "category": 2},   # no file
                 {"video_id": "video4", "split": "train", "category": 2},   # corrupt
                 {"video_id": "video5", "split": "validate", "category": 3}],
      "sentences": [{"video_id": "video1", "caption": "second of one", "sen_id": 3},
                    {"video_id": "video0", "caption": "zero b", "sen_id": 1},
                    {"video_id": "video0", "caption": "zero a", "sen_id": 0},
                    {"video_id": "video1", "caption": "first of one", "sen_id": 2},
                    {"video_id": "video3", "caption": "three", "sen_id": 4},
                    {"video_id": "video4", "caption": "four", "sen_id": 5},
                    {"video_id": "video5", "caption": "five", "sen_id": 6}]}
  test = {"videos": [{"video_id": "video2", "split": "test"}],
          "sentences": [{"video_id": "video2", "caption": "两个", "sen_id": 7},
                        {"video_id": "video2", "caption": "two", "sen_id": 8}]}
  (root / "train_val_videodatainfo.json").write_text(json.dumps(train_val))
  (root / "test_videodatainfo.json").write_text(json.dumps(test, ensure_ascii=False))
  return root


def _cli(*args: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  return subprocess.run([sys.executable, str(REPO / "launch" / "build_shards.py"), *args],
                        capture_output=True, text=True, cwd="/", env=env, timeout=120)


def test_msrvtt_layout_through_the_cli(videos, tmp_path):
  root = _msrvtt(tmp_path / "MSRVTT", videos)
  out = tmp_path / "out"
  result = _cli("--input_format=msrvtt", f"--input={root / 'train_val_videodatainfo.json'}",
                "--msrvtt_split=train", f"--output_dir={out}", "--frames=4", "--frame_size=16",
                "--num_workers=1", "--max_skip_fraction=0.5")
  assert result.returncode == 0, result.stderr
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["written"] == 2 and summary["skipped"] == 2
  assert summary["skipped_by_reason"] == {"missing file": 1, "undecodable video": 1}
  assert {e["video"] for e in summary["skipped_examples"]} == {"video3", "video4"}
  recs = _records(out)
  assert sorted(recs) == [0, 1]                     # ids: N of videoN
  assert recs[0]["meta"]["captions"] == ["zero a", "zero b"]   # sen_id order
  assert recs[1]["caption"] == "first of one" and recs[1]["meta"]["video"] == "video1"
  assert recs[1]["meta"]["split"] == "train" and len(recs[1]["frames"]) == 4

  # Past --max_skip_fraction nothing is written and the error names the commonest reason.
  result = _cli("--input_format=msrvtt", f"--input={root}", "--msrvtt_split=train",
                f"--output_dir={tmp_path / 'out2'}", "--frames=4", "--frame_size=16",
                "--num_workers=1")
  assert result.returncode == 1 and "max_skip_fraction=0.05" in result.stderr
  assert "Traceback" not in result.stderr
  result = _cli("--input_format=msrvtt", f"--input={root}", "--msrvtt_split=tset",
                f"--output_dir={tmp_path / 'out3'}")
  assert result.returncode == 1 and "use one of train, validate, test" in result.stderr


# ---------------------------------------------------------------------------- eval readers
def test_msrvtt_and_jsonl_readers_group_captions_and_pad_short_clips(videos, tmp_path):
  root = _msrvtt(tmp_path / "MSRVTT", videos)
  test = video_sources.open_video_source(f"msrvtt:{root / 'test_videodatainfo.json'}",
                                         num_frames=4, frame_size=16)
  assert len(test) == 1 and test.captions == [[("zh", "两个"), ("en", "two")]]
  assert video_sources.open_video_source(f"msrvtt:{root}", split="eval", num_frames=4,
                                         frame_size=16).captions == test.captions
  got = test.videos.load(np.array([0]))
  assert got["frames"].shape == (1, 4, 16, 16, 3) and got["frame_mask"].tolist() == [[1] * 4]
  # The folder found beside the JSON (videos/all) lacks video3; a wrong video_dir lacks all.
  with pytest.raises(FileNotFoundError, match=r"1 of 4 video\(s\) not found, e.g. video3"):
    video_sources.open_video_source(f"msrvtt:{root}", split="train", num_frames=4,
                                    frame_size=16)
  with pytest.raises(FileNotFoundError, match=r"4 of 4 video\(s\) not found"):
    video_sources.open_video_source(f"msrvtt:{root}", split="train", num_frames=4,
                                    frame_size=16, video_dir=str(tmp_path))

  lines = [{"video": "a.mp4", "caption": "one"}, {"video": "short.mp4", "caption": ["s"]},
           {"video": "a.mp4", "caption": ["两", "two"]}, {"video": "corrupt.mp4", "caption": "x"}]
  path = tmp_path / "eval.jsonl"
  path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines), encoding="utf-8")
  ev = video_sources.open_video_source(f"jsonl:{path}", num_frames=4, frame_size=16,
                                       video_dir=str(videos))
  assert len(ev) == 3
  assert ev.captions[0] == [("en", "one"), ("zh", "两"), ("en", "two")]
  got = ev.videos.load(np.array([1, 0]))
  assert got["frame_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]   # 3 frames, padded
  assert not got["frames"][0, 3].any()
  with pytest.raises(video_decode.VideoError, match=r"jsonl:.*video corrupt.mp4"):
    ev.videos.load(np.array([2]))


def test_shards_and_world_readers(clips_jsonl, tmp_path):
  out = tmp_path / "out"
  video_to_shards.convert(clips_jsonl, out, input_format="video_jsonl", frames=4, frame_size=16,
                          num_workers=1, seed=-1)
  ev = video_sources.open_video_source(f"shards:{out}/train-*.array_record", num_frames=8,
                                       frame_size=16)
  assert ev.captions == [[("en", "a bar moves right"), ("zh", "一条白线向右移动")],
                         [("en", "a grey bar")]]
  got = ev.videos.load(np.array([0]))
  assert got["frames"].shape == (1, 8, 16, 16, 3)
  assert got["frame_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0, 0]]
  direct, _ = video_decode.decode(clips_jsonl.parent / "a.mp4", 4, size=16)
  assert np.abs(got["frames"][0, :4].astype(int) - direct).mean() < 8   # JPEG's loss only

  world = tmp_path / "world"
  world.mkdir()
  frame = video_to_shards.encode_frame(np.full((20, 20, 3), 99, np.uint8))
  shard_writer.write_shard(world / "eval-00000-of-00001.array_record", [records.encode_record(
      {"id": 5, "frames": [frame] * 3, "frame_times": [0.0, 0.25, 0.5], "caption": "red ball",
       "meta": {"captions": ["red ball", "红球"],
                "captions_by_lang": {"en": ["red ball", "a red ball"], "zh": "红球"}}})])
  ws = video_sources.open_video_source("world", split="eval", world_dir=str(world),
                                       num_frames=2, frame_size=8)
  assert ws.captions == [[("en", "red ball"), ("en", "a red ball"), ("zh", "红球")]]
  got = ws.videos.load(np.array([0]))
  assert got["frames"].shape == (1, 2, 8, 8, 3) and got["frame_mask"].tolist() == [[1, 1]]
  with pytest.raises(ValueError, match="use 'world'"):
    video_sources.open_video_source("tfds:x", num_frames=2, frame_size=8)


def test_image_shards_are_refused_by_the_video_reader(tmp_path):
  img = io.BytesIO()
  Image.new("RGB", (8, 8)).save(img, format="PNG")
  shard_writer.write_shard(tmp_path / "train-00000-of-00001.array_record", [
      jsonl_to_shards.make_record(1, img.getvalue(), ["x"], ["en"], "x.png")])
  with pytest.raises(ValueError, match="not a video record"):
    video_sources.open_video_source(f"shards:{tmp_path}/*.array_record", num_frames=2,
                                    frame_size=8)
