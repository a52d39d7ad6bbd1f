"""The on-disk record format shared by every shard writer and reader.

One ArrayRecord record = one msgpack map. Keys:
  id      int    unique, stable example id (used for exact-resume digests)
  image   bytes  an encoded image file (JPEG or PNG), decoded with PIL
  caption str    the caption (any language)
  lang    str    optional language tag ("en", "zh", ...)
  meta    map    optional, dataset-specific (e.g. the synthetic world's attributes)

msgpack (not pickle) so that reading a shard can never execute code.
"""

from __future__ import annotations

from typing import Any

import msgpack

REQUIRED_KEYS = ("id", "image", "caption")


class RecordError(ValueError):
  """A record that cannot be parsed or lacks a required field."""


def encode_record(example: dict[str, Any]) -> bytes:
  missing = [k for k in REQUIRED_KEYS if k not in example]
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
  missing = [k for k in REQUIRED_KEYS if k not in example]
  if missing:
    raise RecordError(f"record is missing keys {missing}")
  return example
