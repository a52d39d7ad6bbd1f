"""Video evaluation data: the video world's splits, video-record shards (launch/build_shards.py),
MSR-VTT and video JSON lines, each as a `VideoSet` for text–video retrieval.

`open_video_source(spec, ...)` reads one:
  world            the video world's split `split`: <world_dir>/{split}-*.array_record
  shards:GLOB      video records written by build_shards (--input_format=video_jsonl / msrvtt)
  msrvtt:PATH      an MSR-VTT *_videodatainfo.json (or their folder), videos {video_id}.mp4 in
                   `video_dir` (default: found beside the JSON); the videos of "split" `split`
  jsonl:PATH       video JSON lines ({"video": path, "caption": [...]}, bigvl.data.video_layouts);
                   a video named on several lines is one target with all their captions
Captions are small and read now (every process holds all of them); frames are read and decoded
when `videos.load(idx)` asks for those rows: {"frames": uint8 (k, T, S, S, 3), "frame_mask":
int32 (k, T)}, T = num_frames, S = frame_size. A clip with fewer frames than T is padded with
mask 0 (evaluation keeps every video: nothing is skipped); stored records with more are subsampled
as training does (`video_decode.uniform_indices`: the centre frame of each of T equal segments;
full decode, no draft); files are sampled uniformly (bigvl.data.video_decode). A video that
cannot be decoded raises VideoError naming it.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any, Callable, Sequence

import numpy as np

from bigvl.data import video_decode, video_layouts
from bigvl.data.formats import records
from bigvl.evaluators import common
from bigvl.evaluators.sources import guess_lang

SOURCES = ("world", "shards", "msrvtt", "jsonl")
VideoError = video_decode.VideoError


@dataclasses.dataclass
class VideoSet:
  videos: common.Rows                        # {"frames": uint8 (k, T, S, S, 3), "frame_mask"}
  captions: list[list[tuple[str, str]]]      # per video: (language, caption) pairs

  def __len__(self) -> int:
    return len(self.videos)


def parse_spec(spec: str) -> tuple[str, str]:
  """"world" → ("world", ""); "shards:GLOB", "msrvtt:PATH", "jsonl:PATH" → (kind, where)."""
  if spec == "world":
    return "world", ""
  kind, sep, where = spec.partition(":")
  if sep and where and kind in SOURCES[1:]:
    return kind, where
  raise ValueError(f"video source {spec!r}: use 'world', 'shards:GLOB' (video records from "
                   "build_shards), 'msrvtt:PATH' (an MSR-VTT *_videodatainfo.json) or "
                   "'jsonl:PATH' (one {\"video\": ..., \"caption\": [...]} per line)")


def open_video_source(spec: str, *, num_frames: int, frame_size: int, split: str = "test",
                      world_dir: str = "", video_dir: str = "", max_examples: int = 0
                      ) -> VideoSet:
  """The VideoSet `spec` names (see the module docstring). `split`: the world's split or
  MSR-VTT's "split" (other sources have none); `video_dir`: where MSR-VTT's videos are, or the
  root of a JSON-lines file's relative paths (default: its folder); `max_examples`: the first so
  many videos (0: all). For MSR-VTT, split "", "eval" or "eval_heldout" is "test". Raises
  ValueError / FileNotFoundError naming what is wrong."""
  kind, where = parse_spec(spec)
  if num_frames < 1 or frame_size < 1:
    raise ValueError(f"num_frames={num_frames}, frame_size={frame_size}: must be positive")
  if kind == "world":
    if not world_dir:
      raise ValueError("video source 'world' needs the video world's folder (world_dir)")
    files = sorted(glob.glob(os.path.join(world_dir, f"{split}-*.array_record")))
    if not files:
      raise FileNotFoundError(f"no shards for split {split!r} in {world_dir}")
    return shards(files, num_frames, frame_size, max_examples, where=f"world {split}")
  if kind == "shards":
    files = sorted(glob.glob(os.path.expanduser(where)))
    if not files:
      raise FileNotFoundError(f"video source shards:{where}: matches no file")
    return shards(files, num_frames, frame_size, max_examples, where=f"shards:{where}")
  if kind == "msrvtt":
    # The common eval defaults ("eval", the world's; "eval_heldout", the image world's) mean
    # MSR-VTT's own evaluation split.
    split = "test" if split in ("", "eval", "eval_heldout") else split
    clips = video_layouts.msrvtt(os.path.expanduser(where), split, video_dir)
    return clip_files(clips, num_frames, frame_size, max_examples, where=f"msrvtt:{where}")
  return clip_files(jsonl(os.path.expanduser(where), video_dir), num_frames, frame_size,
                    max_examples, where=f"jsonl:{where}")


# ---------------------------------------------------------------------------- video records
def record_captions(rec: dict[str, Any]) -> list[tuple[str, str]]:
  """(lang, caption) pairs of a video record: meta.captions_by_lang ({lang: caption or [...]},
  the video world's) when present, else meta.captions with meta.langs (the record's lang for the
  first; guessed where missing), else its caption. Blank captions are left out."""
  meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
  by_lang = meta.get("captions_by_lang")
  if isinstance(by_lang, dict):
    return [(lang, c) for lang in sorted(by_lang)
            for c in ([by_lang[lang]] if isinstance(by_lang[lang], str) else by_lang[lang])
            if isinstance(c, str) and c.strip()]
  texts, langs = meta.get("captions"), meta.get("langs")
  if not isinstance(texts, list) or not texts:
    texts = [rec.get("caption")]
  if not isinstance(langs, list) or len(langs) != len(texts):
    langs = [None] * len(texts)
  langs = [lg if isinstance(lg, str) and lg else None for lg in langs]
  if langs[0] is None and isinstance(rec.get("lang"), str) and rec["lang"]:
    langs[0] = rec["lang"]
  return [(lg or guess_lang(c), c) for c, lg in zip(texts, langs)
          if isinstance(c, str) and c.strip()]


def stored_frames(frames: Sequence[bytes], num_frames: int, frame_size: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """A record's encoded frames as evaluation decodes them (in full, no JPEG draft): training's
  `video_text.decode_frames`."""
  from bigvl.data.formats import video_text
  return video_text.decode_frames(frames, num_frames, frame_size, draft=False)


def shards(files: Sequence[str], num_frames: int, frame_size: int, max_examples: int = 0,
           where: str = "shards") -> VideoSet:
  """Video records of ArrayRecord `files`: captions read now (one pass), frames when loaded."""
  import grain
  source = grain.sources.ArrayRecordDataSource(list(files))
  n = len(source) if not max_examples else min(len(source), max_examples)

  def record(i: int, raw: bytes) -> dict[str, Any]:
    try:
      rec = records.decode_record(raw)
    except records.RecordError as e:
      raise records.RecordError(f"{where}: record {i}: {e}") from None
    if not records.is_video(rec):
      raise ValueError(f"{where}: record {i} (id {rec.get('id')}) is not a video record (no "
                       "frames): image shards?")
    return rec

  captions = []
  for start in range(0, n, 256):
    idx = list(range(start, min(n, start + 256)))
    for i, raw in zip(idx, source.__getitems__(idx)):
      rec = record(i, raw)
      caps = record_captions(rec)
      if not caps:
        raise ValueError(f"{where}: record {i} (id {rec['id']}) has no caption")
      captions.append(caps)
  if not n:
    raise ValueError(f"{where}: no records")

  def load(idx: np.ndarray) -> dict[str, np.ndarray]:
    frames, masks = [], []
    for i, raw in zip(idx, source.__getitems__([int(i) for i in idx])):
      rec = record(int(i), raw)
      try:
        f, m = stored_frames(rec["frames"], num_frames, frame_size)
      except Exception as e:  # PIL raises many types
        raise VideoError(video_decode.UNREADABLE, f"{where}: record {int(i)} (id {rec['id']})",
                         f"a frame does not decode ({type(e).__name__}: {e})") from None
      frames.append(f)
      masks.append(m)
    return {"frames": np.stack(frames), "frame_mask": np.stack(masks)}

  return VideoSet(common.Rows(n, load), captions)


# ---------------------------------------------------------------------------- video files
def jsonl(path: str, root: str = "") -> list[video_layouts.Clip]:
  """The clips of a video JSON-lines file, a clip named on several lines (same video, start and
  end) once with all their captions; a bad line raises ValueError naming it."""
  root = root or os.path.dirname(os.path.abspath(path))
  clips: dict[tuple[str, Any, Any], video_layouts.Clip] = {}
  with open(path, encoding="utf-8-sig") as f:
    for line_no, text in enumerate(f, 1):
      if not text.strip():
        continue
      clip = video_layouts.video_line(line_no, text, root)
      if isinstance(clip, str):
        raise ValueError(f"{path}:{line_no}: {clip}")
      key = (clip.path, clip.start, clip.end)
      if key in clips:
        old = clips[key]
        old.lang = _langs(old) + _langs(clip)
        old.captions = old.captions + clip.captions
      else:
        clips[key] = clip
  if not clips:
    raise ValueError(f"{path}: no videos")
  return list(clips.values())


def _langs(clip: video_layouts.Clip) -> list[str]:
  given = clip.lang
  if isinstance(given, list) and len(given) == len(clip.captions):
    tags = [g if isinstance(g, str) and g else None for g in given]
  else:
    tags = [given if isinstance(given, str) and given else None] + [None] * (len(clip.captions) - 1)
  return [t or guess_lang(c) for t, c in zip(tags, clip.captions)]


def clip_files(clips: list[video_layouts.Clip], num_frames: int, frame_size: int,
               max_examples: int = 0, where: str = "videos") -> VideoSet:
  """Clips of video files, decoded when loaded (uniform sampling, padded with frame_mask 0).
  Every file is checked to exist now, so a wrong folder fails when the run starts."""
  if max_examples:
    clips = clips[:max_examples]
  missing = [c for c in clips if not os.path.isfile(c.path)]
  if missing:
    raise FileNotFoundError(f"{where}: {len(missing)} of {len(clips)} video(s) not found, e.g. "
                            f"{missing[0].name} at {missing[0].path} (set the eval's video_dir "
                            "to the videos' folder)")
  uncaptioned = [c for c in clips if not c.captions]
  if uncaptioned:
    raise ValueError(f"{where}: video {uncaptioned[0].name} has no caption ({len(uncaptioned)} "
                     "such)")
  captions = [list(zip(_langs(c), c.captions)) for c in clips]
  name: Callable[[video_layouts.Clip], str] = lambda c: f"{where}: video {c.name} ({c.path})"

  def load(idx: np.ndarray) -> dict[str, np.ndarray]:
    frames = np.zeros((len(idx), num_frames, frame_size, frame_size, 3), np.uint8)
    mask = np.zeros((len(idx), num_frames), np.int32)
    for row, i in enumerate(idx):
      clip = clips[int(i)]
      pixels, _ = video_decode.decode(clip.path, num_frames, size=frame_size, start=clip.start,
                                      end=clip.end, min_frames=1, name=name(clip))
      frames[row, :len(pixels)] = pixels
      mask[row, :len(pixels)] = 1
    return {"frames": frames, "frame_mask": mask}

  return VideoSet(common.Rows(len(clips), load), captions)
