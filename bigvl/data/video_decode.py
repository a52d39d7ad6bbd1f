"""Decoding a video file into a few sampled RGB frames (PyAV), for the shard converter
(data_pipelines/video_to_shards.py) and the evaluation readers (bigvl/evaluators/video_sources.py).

Times are the stream's presentation timestamps (`pts * time_base`) counted from the stream's start,
never frame counts over a nominal rate, so a variable-frame-rate video samples the right moments.

Which frames (`sample_times`, then `_pick`):
  * uniform (no fps, the default): the centres of `num_frames` equal segments of the clip,
    t_i = (i + 0.5) * duration / num_frames, as CLIP4Clip and big_vision sample a clip; each time
    takes the frame on screen then (the last one shown at or before it). For a constant frame rate
    this is frame floor((i + 0.5) * n / num_frames) of the clip's n frames (`uniform_indices`, the
    rule stored frames are subsampled with). Picks are kept distinct and in order (a
    variable-rate clip can show one frame through two centres: the later pick moves to the next
    frame), so a clip of at least `num_frames` frames gives `num_frames`.
    A clip of fewer frames gives all of them (the reader pads with frame_mask 0).
  * `fps`: t_k = k / fps from the clip's start while inside the clip, the FIRST `num_frames` of
    them (of a clip longer than num_frames / fps seconds only the first that many seconds are
    sampled: no stride over the rest); a frame shown through two of those times is taken once.
The clip is [start, end) of the video (default: all of it); its duration runs to the end of the
last frame (its pts plus its packet's duration).

"Too short": fewer than `min_frames` (default `num_frames`) DISTINCT decoded frames picked from the
clip, i.e. the clip holds fewer frames than that, or (with fps) fewer sampling times fit in it, or
decoding broke off before enough of them. It raises VideoError, as do a file that is missing,
cannot be opened or demuxed, or has no video stream.

Frames are read in two passes: the packets' timestamps first (demuxing only, no decoding: cheap),
then a decode that converts only the picked frames, so a long video is never held in memory
decoded. With `start`, both passes seek to the keyframe before it.
"""

from __future__ import annotations

import io
import os

import numpy as np

MISSING, UNREADABLE, NO_STREAM, TOO_SHORT = ("missing file", "undecodable video",
                                             "no video stream", "too short")


class VideoError(ValueError):
  """A video that cannot be used; the message is one line, "<reason>: <name>: <details>", and
  `reason` is one of MISSING, UNREADABLE, NO_STREAM, TOO_SHORT."""

  def __init__(self, reason: str, name: str, details: str = ""):
    text = f"{reason}: {name}" + (f": {details}" if details else "")
    super().__init__(" ".join(text.split()))  # one line, whatever FFmpeg said
    self.reason = reason


def sample_times(duration: float, num_frames: int, fps: float | None = None) -> np.ndarray:
  """Sampling times in seconds from the clip's start (see the module docstring): uniform segment
  centres, or every 1 / fps seconds (the first num_frames of them inside the clip)."""
  if num_frames < 1:
    raise ValueError(f"num_frames={num_frames}: must be at least 1")
  if duration <= 0:
    return np.zeros((0,), np.float64)
  if fps is None:
    return (np.arange(num_frames) + 0.5) * (duration / num_frames)
  if fps <= 0:
    raise ValueError(f"fps={fps}: must be positive")
  count = min(num_frames, int(np.ceil(duration * fps - 1e-9)))
  return np.arange(count) / fps


def uniform_indices(available: int, num_frames: int) -> np.ndarray:
  """Which of `available` stored frames to keep: all when they fit, else the centre frame of each
  of `num_frames` equal segments (the rule `decode` samples times with, over frame indices)."""
  if available <= num_frames:
    return np.arange(available)
  return np.floor((np.arange(num_frames) + 0.5) * available / num_frames).astype(np.int64)


def _pick(times: np.ndarray, targets: np.ndarray, distinct: bool) -> np.ndarray:
  """Indices into sorted frame `times` of the frame on screen at each target; with `distinct`
  (needs len(times) >= len(targets)) strictly increasing, else repeats dropped."""
  idx = np.clip(np.searchsorted(times, targets, side="right") - 1, 0, len(times) - 1)
  if not distinct:
    return np.unique(idx)
  n, t = len(times), len(idx)
  for i in range(1, t):
    idx[i] = max(idx[i], idx[i - 1] + 1)
  for i in range(t - 1, -1, -1):  # pushed past the end: pull back, still increasing
    idx[i] = min(idx[i], n - t + i)
  return idx


def _resize(frame, size: int | None) -> np.ndarray:
  """A PyAV frame → uint8 RGB (H, W, 3): shorter side `size` then the centre size×size crop."""
  if not size:
    return frame.to_ndarray(format="rgb24")
  w, h = frame.width, frame.height
  scale = size / min(w, h)
  nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
  # AREA when shrinking (averages, no aliasing), BICUBIC when enlarging.
  pixels = frame.reformat(width=nw, height=nh, format="rgb24",
                          interpolation="AREA" if scale < 1 else "BICUBIC").to_ndarray()
  top, left = (nh - size) // 2, (nw - size) // 2
  return np.ascontiguousarray(pixels[top:top + size, left:left + size])


def _open(source, name: str):
  import av
  if isinstance(source, (bytes, bytearray, memoryview)):
    source = io.BytesIO(bytes(source))
  elif not os.path.isfile(source):
    raise VideoError(MISSING, name)
  try:
    container = av.open(source, "r")
  except (av.error.FFmpegError, OSError) as e:
    raise VideoError(UNREADABLE, name, f"cannot open ({e})") from None
  if not container.streams.video:
    container.close()
    raise VideoError(NO_STREAM, name)
  return container


def _seek(container, stream, pts: int) -> None:
  import av
  try:
    container.seek(pts, stream=stream, backward=True)
  except av.error.FFmpegError:
    container.seek(0, stream=stream, backward=True)  # not seekable: read from the start


def _packet_times(source, name: str, start: float | None
                  ) -> tuple[list[int], list[int], int, float]:
  """(sorted pts, their packet durations, the stream's start pts, its time base)."""
  import av
  container = _open(source, name)
  try:
    stream = container.streams.video[0]
    base = float(stream.time_base)
    zero = stream.start_time or 0
    if start:
      _seek(container, stream, zero + int(start / base))
    pairs = []
    try:
      for packet in container.demux(stream):
        if packet.pts is not None and packet.size:
          pairs.append((packet.pts, packet.duration or 0))
    except av.error.FFmpegError as e:
      if not pairs:
        raise VideoError(UNREADABLE, name, f"cannot demux ({e})") from None
  finally:
    container.close()
  pairs.sort()
  return [p for p, _ in pairs], [d for _, d in pairs], zero, base


def decode(source: str | os.PathLike | bytes, num_frames: int, *, fps: float | None = None,
           size: int | None = None, start: float | None = None, end: float | None = None,
           min_frames: int | None = None, name: str | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
  """`num_frames` (or fewer, see the module docstring) frames of the clip [start, end) of the
  video at `source` (a path or the file's bytes), sampled uniformly or at `fps`.

  Returns (uint8 (T, H, W, 3) frames, float64 (T,) their times in seconds from the video's start,
  increasing); with `size`, H = W = size (the shorter side resized to it, then the centre crop).
  Raises VideoError naming `name` (default: the path) for a missing, unreadable or stream-less
  file, or a clip too short for `min_frames` (default num_frames).
  """
  import av
  if isinstance(source, os.PathLike):
    source = os.fspath(source)
  name = name or (source if isinstance(source, str) else "<video bytes>")
  min_frames = num_frames if min_frames is None else min_frames
  if start is not None and end is not None and end <= start:
    raise VideoError(TOO_SHORT, name, f"clip end {end} s is not after its start {start} s")

  all_pts, durations, zero, base = _packet_times(source, name, start)
  times = (np.asarray(all_pts, np.float64) - zero) * base
  lo = start or 0.0
  keep = times >= lo - 1e-6 if start else np.ones(len(times), bool)
  if end is not None:
    keep &= times < end
  times, durations = times[keep], np.asarray(durations, np.float64)[keep]
  pts = [p for p, k in zip(all_pts, keep) if k]
  if len(times) == 0:
    raise VideoError(TOO_SHORT, name, f"no frames in the clip, needs {min_frames}")
  gaps = np.diff(times)
  last = durations[-1] * base if durations[-1] > 0 else (np.median(gaps) if len(gaps) else 0.0)
  clip_end = times[-1] + last if end is None else min(end, times[-1] + last)
  clip_start = lo if start else times[0]
  targets = clip_start + sample_times(max(clip_end - clip_start, 1e-9), num_frames, fps)
  if fps is None and len(times) <= num_frames:
    picked = np.arange(len(times))
  else:
    picked = _pick(times, targets, distinct=fps is None)
  wanted = {pts[i] for i in picked}
  if len(wanted) < min_frames:
    raise VideoError(TOO_SHORT, name, f"{len(wanted)} frame(s) in the clip, needs {min_frames}")

  got: dict[int, np.ndarray] = {}
  container = _open(source, name)
  try:
    stream = container.streams.video[0]
    if start:
      _seek(container, stream, zero + int(start / base))
    try:
      for k, frame in enumerate(container.decode(stream)):
        # A decoder that drops timestamps still emits frames in presentation order.
        at = frame.pts if frame.pts is not None else all_pts[min(k, len(all_pts) - 1)]
        if at in wanted and at not in got:
          got[at] = _resize(frame, size)
          if len(got) == len(wanted):
            break
    except av.error.FFmpegError as e:
      if len(got) < min_frames:
        raise VideoError(UNREADABLE, name, f"decoding failed after {len(got)} frame(s) ({e})"
                         ) from None
  finally:
    container.close()
  if len(got) < min_frames:
    raise VideoError(TOO_SHORT, name, f"{len(got)} frame(s) decoded, needs {min_frames}")
  order = sorted(got)
  return np.stack([got[p] for p in order]), (np.asarray(order, np.float64) - zero) * base

