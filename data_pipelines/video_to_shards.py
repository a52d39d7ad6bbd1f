"""Converts (video, captions) sets into ArrayRecord shards of VIDEO records: a few frames sampled
from each video (bigvl.data.video_decode) and every caption.

Inputs (`input_format`; the layouts are bigvl.data.video_layouts'):
  video_jsonl   JSON lines {"video": path, "caption": str or [str, ...]} (optionally "lang" /
                "langs", "start" / "end" seconds); paths relative to the file's folder
  msrvtt        MSR-VTT's train_val_videodatainfo.json / test_videodatainfo.json (or a folder
                holding them), videos {video_id}.mp4 in `video_dir` (default: found beside the
                JSON); `msrvtt_split` keeps one "split" (train, validate or test; "": every video)

The record written (bigvl.data.formats.records, video):
  id           JSONL: the 1-based line number; MSR-VTT: N of "videoN" (else the 1-based place)
  frames       `frames` frames sampled uniformly over the clip (or at `fps`), each resized so the
               shorter side is `frame_size` and centre-cropped to frame_size × frame_size (0: the
               video's own size), JPEG quality 90; a clip with fewer frames keeps what it has
  frame_times  each frame's time in seconds from the video's start
  caption      the first caption; lang its language when known (given, else guessed)
  meta         captions: every caption; langs: one tag (or None) per caption; video: the path as
               the JSONL wrote it, or MSR-VTT's video_id (with split, its "split")

As for images (data_pipelines.jsonl_to_shards, whose core writes the split): one record per
clip; clips shuffled across shards by `seed` (-1 keeps input order); videos decoded in worker
processes; a missing, undecodable or too short video (fewer than `min_frames`, default `frames`,
distinct frames: bigvl.data.video_decode), a bad line or a captionless video is skipped, counted
by reason and the first few named; past `max_skip_fraction` nothing is written
(SkipFractionError). An identical earlier build (same input files, videos' sizes and
modification times, and parameters) is reused unless `force`.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from bigvl.data import video_decode, video_layouts
from bigvl.data.formats.records import encode_record
from data_pipelines import jsonl_to_shards, parallel, shard_writer
from data_pipelines.jsonl_to_shards import Outcome, Skips

FORMATS = ("video_jsonl", "msrvtt")
JPEG_QUALITY = 90
# Bumped when the records written for the same input change.
LAYOUT = 1


def encode_frame(pixels: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="JPEG", quality=JPEG_QUALITY)
  return out.getvalue()


def make_record(record_id: int, frames: np.ndarray, times: np.ndarray,
                clip: video_layouts.Clip) -> bytes:
  langs = jsonl_to_shards.caption_langs(clip.captions, clip.lang)
  meta: dict[str, Any] = {"captions": clip.captions, "langs": langs, "video": clip.name}
  if clip.split:
    meta["split"] = clip.split
  example: dict[str, Any] = {
      "id": record_id, "frames": [encode_frame(f) for f in frames],
      "frame_times": [round(float(t), 6) for t in times], "caption": clip.captions[0],
      "meta": meta}
  if langs[0]:
    example["lang"] = langs[0]
  return encode_record(example)


def _where(clip: video_layouts.Clip, by_line: bool) -> dict[str, Any]:
  return {"line": clip.order, "video": clip.name} if by_line else {"video": clip.name}


def _describe(where: dict[str, Any]) -> str:
  """How the skip-fraction error names a skipped clip: "line 6 (clips/a.mp4)", "video video7"."""
  if "line" in where:
    return f"line {where['line']}" + (f" ({where['video']})" if "video" in where else "")
  return f"video {where['video']}"


def _process(task: tuple[video_layouts.Clip, int, bool, dict[str, Any]]) -> Outcome:
  clip, record_id, by_line, opts = task
  where = _where(clip, by_line)
  if not clip.captions:
    return Outcome(clip.order, where, None, f"empty caption: {clip.name} has none")
  try:
    frames, times = video_decode.decode(clip.path, opts["frames"], fps=opts["fps"],
                                        size=opts["frame_size"] or None, start=clip.start,
                                        end=clip.end, min_frames=opts["min_frames"])
  except video_decode.VideoError as e:
    return Outcome(clip.order, where, None, str(e))
  return Outcome(clip.order, where, make_record(record_id, frames, times, clip), None)


def _videos_digest(clips: list[video_layouts.Clip]) -> str:
  """SHA-256 over each video's path, size and modification time (missing ones marked): cheap,
  and a re-downloaded video changes it (see to_shards.stat_digest)."""
  h = hashlib.sha256()
  for c in clips:
    try:
      st = os.stat(c.path)
      h.update(f"{os.path.realpath(c.path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except OSError:
      h.update(f"{c.path}\0missing\n".encode())
  return h.hexdigest()


def _read_jsonl(path: Path, skips: Skips) -> list[video_layouts.Clip]:
  clips = []
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      try:
        text = raw.decode("utf-8-sig")
      except UnicodeDecodeError:
        skips.add(line_no, {"line": line_no}, "malformed json line: not UTF-8")
        continue
      if not text.strip():
        continue
      parsed = video_layouts.video_line(line_no, text, str(path.parent))
      if isinstance(parsed, str):
        skips.add(line_no, {"line": line_no}, parsed)
      else:
        clips.append(parsed)
  return clips


def _renamed(summary: dict[str, Any]) -> dict[str, Any]:
  out = {k: v for k, v in summary.items() if k != "images_per_s"}
  return out | {"videos_per_s": summary.get("images_per_s", 0.0)}


def convert(input_path: str | os.PathLike, output_dir: str | os.PathLike, *, input_format: str,
            split: str = "train", num_shards: int = 1, frames: int = 8, fps: float | None = None,
            frame_size: int = 224, min_frames: int | None = None, video_dir: str = "",
            msrvtt_split: str = "", seed: int = 0, num_workers: int | None = None,
            force: bool = False, max_skip_fraction: float = 1.0) -> dict[str, Any]:
  """Writes `split` shards of video records for the input (see the module docstring); returns
  the summary: written, skipped, skipped_by_reason, skipped_examples (the first few, each with
  its line or video and the reason), split, output_dir, num_shards, reused, seconds,
  videos_per_s, input_format. Raises SkipFractionError (nothing published) past
  `max_skip_fraction`, ValueError for a bad argument or an unreadable MSR-VTT file."""
  start = time.monotonic()
  if input_format not in FORMATS:
    raise ValueError(f"input_format={input_format!r}: use one of {', '.join(FORMATS)}")
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  if frames < 1:
    raise ValueError(f"frames={frames}: must be at least 1")
  min_frames = frames if min_frames is None else min_frames
  if not 1 <= min_frames <= frames:
    raise ValueError(f"min_frames={min_frames}: must be between 1 and frames={frames}")
  if fps is not None and fps <= 0:
    raise ValueError(f"fps={fps}: must be positive (leave it unset to sample uniformly)")
  if frame_size < 0:
    raise ValueError(f"frame_size={frame_size}: must be positive (0 keeps the video's size)")
  input_path, output_dir = Path(os.path.expanduser(input_path)), Path(output_dir)

  skips = Skips()
  by_line = input_format == "video_jsonl"
  if by_line:
    if not input_path.is_file():
      raise FileNotFoundError(f"--input: {input_path} is not a file")
    if video_dir or msrvtt_split:
      raise ValueError("video_dir and msrvtt_split are for input_format=msrvtt (JSON-lines "
                       "paths are relative to the file's folder)")
    sources = [input_path]
    clips = _read_jsonl(input_path, skips)
    ids = [c.order for c in clips]
  else:
    sources = [Path(p) for p in video_layouts.msrvtt_files(str(input_path))]
    clips = video_layouts.msrvtt(str(input_path), msrvtt_split, video_dir)
    ids = video_layouts.msrvtt_ids(clips)

  params = {
      "input_format": input_format, "input": str(input_path.resolve()),
      "input_sha256": [shard_writer.file_sha256(p) for p in sources],
      "videos_digest": _videos_digest(clips), "video_dir": video_dir or None,
      "msrvtt_split": msrvtt_split or None, "frames": frames, "fps": fps,
      "frame_size": frame_size or None, "min_frames": min_frames, "num_shards": num_shards,
      "seed": seed, "layout": LAYOUT}
  done = jsonl_to_shards.reusable(output_dir, split, params, force, start)
  if done is not None:
    return _renamed(done) | {"input_format": input_format}

  order = list(range(len(clips)))
  if seed >= 0:
    order = np.random.default_rng(seed).permutation(len(clips)).tolist()
  opts = {"frames": frames, "fps": fps, "frame_size": frame_size, "min_frames": min_frames}
  tasks = [(clips[i], ids[i], by_line, opts) for i in order]
  if num_workers is None:
    num_workers = parallel.default_num_workers()
  if len(tasks) < 8:
    num_workers = 1  # starting workers would cost more than a few videos
  outcomes: Iterator[Outcome] = parallel.imap(_process, tasks, num_workers, chunk_size=2)
  try:
    summary = jsonl_to_shards.write_split(
        output_dir, split, num_shards, params, outcomes, skips,
        max_skip_fraction=max_skip_fraction, start=start, noun="lines" if by_line else "videos",
        describe=_describe)
  except jsonl_to_shards.SkipFractionError as e:
    e.summary = _renamed(e.summary) | {"input_format": input_format}
    raise
  return _renamed(summary) | {"input_format": input_format}
