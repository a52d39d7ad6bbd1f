"""The on-disk layouts of video–caption sets, read alike by the shard converter
(data_pipelines/video_to_shards.py) and the evaluation readers (bigvl/evaluators/video_sources.py).

Video JSON lines, one clip per line (`video_line`):
  {"video": "clips/a.mp4", "caption": "a dog runs"}
  {"video": "/abs/b.mp4", "captions": ["一只狗在跑", "a dog runs"], "lang": "zh",
   "start": 3.5, "end": 9.0}
  "caption" (or "captions") is a string or a list of strings; "lang" the first caption's language
  or "langs" one per caption; "start" / "end" (seconds) cut a clip from the video. Relative paths
  are against the file's folder (or a given root).

MSR-VTT (`msrvtt`): train_val_videodatainfo.json (splits "train" and "validate") and
test_videodatainfo.json ("test"), each
  {"videos": [{"video_id": "video0", "split": "train", "category": 9, ...}, ...],
   "sentences": [{"video_id": "video0", "caption": "a man ...", "sen_id": 0}, ...]}
  with the videos as {video_id}.mp4 in one folder (`msrvtt_video_dir`). A video's captions are its
  sentences in sen_id order. The official split (6513 / 497 / 2990 videos); the 1k-A test set that
  many papers report on (JSFusion's 1000 test videos) is a subset of "train_val" videos and needs
  its own list, e.g. as video JSON lines.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

MSRVTT_FILES = ("train_val_videodatainfo.json", "test_videodatainfo.json")
MSRVTT_SPLITS = ("train", "validate", "test")
# Where the MSR-VTT videos are when no folder is given, relative to the JSON's folder: beside it,
# the original release's folders, and the common repackaging (MSRVTT/videos/all).
MSRVTT_VIDEO_DIRS = (".", "TrainValVideo", "TestVideo", os.path.join("videos", "all"), "videos")
_VIDEO_NUMBER = re.compile(r"video(\d+)")


@dataclasses.dataclass
class Clip:
  """One clip of a layout."""
  order: int                 # JSONL: the 1-based line; MSR-VTT: 1-based place in "videos"
  name: str                  # how the input names it: the path as written, or the video_id
  path: str                  # the video file
  captions: list[str]        # non-empty, trimmed of surrounding whitespace
  lang: Any = None           # as given: a string (the first caption's) or a list (one each)
  start: float | None = None
  end: float | None = None
  split: str = ""            # MSR-VTT's


def clean_captions(raw: Any) -> list[str] | str:
  """The non-empty captions of a string or list of strings, or why there are none."""
  if raw is None:
    return "missing caption"
  if isinstance(raw, str):
    raw = [raw]
  elif not isinstance(raw, (list, tuple)):
    return f"malformed caption: a {type(raw).__name__}, not a string or a list of strings"
  captions = [c.strip() for c in raw if isinstance(c, str) and c.strip()]
  return captions or "empty caption"


def _seconds(obj: dict[str, Any], key: str) -> float | None | str:
  value = obj.get(key)
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
    return f"malformed clip: {key!r} is {value!r}, not seconds"
  return float(value)


def video_line(line_no: int, text: str, root: str) -> Clip | str:
  """A Clip from one JSON line, or the reason it cannot be one ("malformed json line: ...",
  "missing 'video' field", "empty caption", ...: the kind before the first colon)."""
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    return f"malformed json line: {e.msg}"
  if not isinstance(obj, dict):
    return f"malformed json line: expected an object, got {type(obj).__name__}"
  video = obj.get("video")
  if not isinstance(video, str) or not video:
    return "missing 'video' field"
  captions = clean_captions(obj["captions"] if "captions" in obj else obj.get("caption"))
  if isinstance(captions, str):
    return captions
  start, end = _seconds(obj, "start"), _seconds(obj, "end")
  for v in (start, end):
    if isinstance(v, str):
      return v
  if start is not None and end is not None and end <= start:
    return f"malformed clip: end {end} is not after start {start}"
  lang = obj["langs"] if isinstance(obj.get("langs"), list) else obj.get("lang")
  path = video if os.path.isabs(video) else os.path.join(root, video)
  return Clip(line_no, video, path, captions, lang, start, end)


def _load_json(path: str) -> dict[str, Any]:
  with open(path, encoding="utf-8") as f:
    try:
      doc = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
  if (not isinstance(doc, dict) or not isinstance(doc.get("videos"), list)
      or not isinstance(doc.get("sentences"), list)):
    raise ValueError(f"{path}: needs \"videos\" and \"sentences\" lists (an MSR-VTT "
                     "*_videodatainfo.json)")
  return doc


def msrvtt_files(path: str) -> list[str]:
  """The MSR-VTT JSON files `path` names: itself, or those of MSRVTT_FILES in a folder."""
  if os.path.isdir(path):
    found = [os.path.join(path, f) for f in MSRVTT_FILES if os.path.isfile(os.path.join(path, f))]
    if not found:
      raise FileNotFoundError(f"{path}: holds none of {', '.join(MSRVTT_FILES)}")
    return found
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such MSR-VTT JSON file")
  return [path]


def msrvtt_video_dir(json_path: str, video_dir: str, first_video: str) -> str:
  """`video_dir` if given, else the first of MSRVTT_VIDEO_DIRS (beside the JSON) that holds
  `first_video`.mp4 (the JSON's folder when none does: every video is then missing)."""
  if video_dir:
    return video_dir
  here = os.path.dirname(os.path.abspath(json_path)) if os.path.isfile(json_path) else json_path
  for d in MSRVTT_VIDEO_DIRS:
    if os.path.isfile(os.path.join(here, d, f"{first_video}.mp4")):
      return os.path.normpath(os.path.join(here, d))
  return here


def msrvtt(path: str, split: str = "", video_dir: str = "") -> list[Clip]:
  """The clips of an MSR-VTT JSON file (or a folder of them) whose "split" is `split` ("": all),
  in the order of "videos", each with every sentence (in sen_id order). Raises ValueError naming
  the file for a malformed one, or a split it does not hold. Videos with no sentence have none
  (the converter skips them, an evaluation reader refuses them)."""
  if split and split not in MSRVTT_SPLITS:
    raise ValueError(f"MSR-VTT split {split!r}: use one of {', '.join(MSRVTT_SPLITS)}")
  clips: list[Clip] = []
  seen_splits: set[str] = set()
  for json_path in msrvtt_files(path):
    doc = _load_json(json_path)
    rows: dict[str, int] = {}
    videos = []
    for i, v in enumerate(doc["videos"]):
      if not isinstance(v, dict) or not isinstance(v.get("video_id"), str) or not v["video_id"]:
        raise ValueError(f"{json_path}: videos[{i}] needs a \"video_id\" string")
      if v["video_id"] in rows:
        raise ValueError(f"{json_path}: videos[{i}]: video_id {v['video_id']!r} appears twice")
      rows[v["video_id"]] = i
      videos.append(v)
    sentences: list[list[tuple[Any, int, str]]] = [[] for _ in videos]
    for j, s in enumerate(doc["sentences"]):
      if (not isinstance(s, dict) or s.get("video_id") not in rows
          or not isinstance(s.get("caption"), str)):
        raise ValueError(f"{json_path}: sentences[{j}] needs a \"caption\" string and a "
                         "\"video_id\" of \"videos\"")
      sen_id = s.get("sen_id")
      key = sen_id if isinstance(sen_id, int) and not isinstance(sen_id, bool) else j
      sentences[rows[s["video_id"]]].append((key, j, s["caption"]))
    if not videos:
      continue
    folder = msrvtt_video_dir(json_path, video_dir, videos[0]["video_id"])
    for i, v in enumerate(videos):
      seen_splits.add(str(v.get("split", "")))
      if split and v.get("split") != split:
        continue
      captions = clean_captions([c for _, _, c in sorted(sentences[i])])
      clips.append(Clip(len(clips) + 1, v["video_id"],
                        os.path.join(folder, f"{v['video_id']}.mp4"),
                        [] if isinstance(captions, str) else captions, split=str(v.get("split"))))
  if not clips:
    has = ", ".join(sorted(s for s in seen_splits if s)) or "none"
    raise ValueError(f"{path}: no MSR-VTT videos" + (f" of split {split!r} (it has: {has})"
                                                      if split else ""))
  return clips


def msrvtt_ids(clips: list[Clip]) -> list[int]:
  """Record ids of MSR-VTT clips: the number of "video<N>" when every id has that form (stable
  across files and splits), else the clip's 1-based place."""
  numbers = [_VIDEO_NUMBER.fullmatch(c.name) for c in clips]
  if all(numbers) and len({int(m[1]) for m in numbers}) == len(clips):
    return [int(m[1]) for m in numbers]
  return [c.order for c in clips]
