"""The on-disk record format shared by every shard writer and reader.

One ArrayRecord record = one msgpack map. Keys:
  id      int    unique, stable example id (used for exact-resume digests)
  image   bytes  an encoded image file (JPEG or PNG), decoded with PIL
  caption str    the caption (any language)
  lang    str    optional language tag ("en", "zh", ...)
  meta    map    optional, dataset-specific (e.g. the synthetic world's attributes; "captions":
                 every caption of the example, any language)

A video record has `frames` instead of `image`:
  frames       [bytes]  the sampled frames in time order, each an encoded image (JPEG)
  frame_times  [float]  optional: each frame's time in seconds from the start of the video

msgpack (not pickle) so that reading a shard can never execute code.
"""

from __future__ import annotations

from typing import Any

import msgpack

REQUIRED_KEYS = ("id", "image", "caption")
VIDEO_REQUIRED_KEYS = ("id", "frames", "caption")


class RecordError(ValueError):
  """A record that cannot be parsed or lacks a required field."""


def _required(example: dict[str, Any]) -> tuple[str, ...]:
  return VIDEO_REQUIRED_KEYS if "frames" in example else REQUIRED_KEYS


def is_video(example: dict[str, Any]) -> bool:
  return "frames" in example


def encode_record(example: dict[str, Any]) -> bytes:
  missing = [k for k in _required(example) if k not in example]
  if missing:
    raise RecordError(f"record is missing keys {missing}: has {sorted(example)}")
  return msgpack.packb(example, use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
  try:
    example = msgpack.unpackb(data, raw=False)
  except Exception as e:  # msgpack raises several unrelated types.
    raise RecordError(f"record of {len(data)} bytes is not valid msgpack: {e}") from e
  if not isinstance(example, dict):
    raise RecordError(f"record is a {type(example).__name__}, expected a map")
  missing = [k for k in _required(example) if k not in example]
  if missing:
    raise RecordError(f"record is missing keys {missing}")
  return example
