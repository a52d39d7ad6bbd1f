"""The image-caption record format (`bigvl.data.formats.records`: id, encoded image, caption) on the stream.

Training examples decode the image in JPEG draft mode (reduced-scale decoding, then a bicubic
resize) and keep it uint8 until batching; evaluation decodes in full, as the reference transform
does. Besides the stream's own `BAD_RECORD` (unreadable or invalid msgpack, a missing key), a record
is skipped for an undecodable image (`BAD_IMAGE`) or a missing or empty caption (`BAD_CAPTION`).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from bigvl.data import image_ops
from bigvl.data.formats import records
from bigvl.data import stream
from bigvl.tokenizers import glm

# Reasons a record is skipped, as counted in `stream.skipped_counts()` and `TrainIterator.stats()`.
BAD_RECORD, BAD_IMAGE, BAD_CAPTION = stream.BAD_RECORD, "bad_image", "bad_caption"
REASONS = (BAD_RECORD, BAD_IMAGE, BAD_CAPTION)


def _caption(rec: dict[str, Any], draw: int | None) -> Any:
  """The record's caption, or with `draw` (training) one of `meta["captions"]` when that is a list
  (the reference M²-Encoder format, every caption kept by build_shards): drawn anew at each pass."""
  meta = rec.get("meta")
  options = meta.get("captions") if isinstance(meta, dict) else None
  if draw is None or not isinstance(options, list):
    return rec["caption"]
  options = [c for c in options if isinstance(c, str) and c.strip()]
  return options[draw % len(options)] if options else rec["caption"]


def _parse(raw: bytes, *, tokenizer: glm.GLMTokenizer, image_size: int,
           draft: bool, draw: int | None = None) -> dict[str, Any]:
  """One record -> model example with a uint8 image; raises stream.RecordFailure. `draw` (from
  the training stream) picks one of a record's captions."""
  try:
    rec = records.decode_record(raw)
    example_id = int(rec["id"])
  except (records.RecordError, TypeError, ValueError) as e:
    raise stream.RecordFailure(BAD_RECORD, e) from e
  caption = _caption(rec, draw)
  if not isinstance(caption, str) or not caption.strip():
    raise stream.RecordFailure(BAD_CAPTION, ValueError(f"caption is {caption!r}"))
  if not isinstance(rec["image"], bytes):
    raise stream.RecordFailure(
        BAD_IMAGE, TypeError(f"image is {type(rec['image']).__name__}"))
  try:
    image = image_ops.decode_image(rec["image"], image_size, draft=draft)
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, ...).
    raise stream.RecordFailure(BAD_IMAGE, e) from e
  text, text_mask = tokenizer.encode(caption)
  return {"image": image, "text": text, "text_mask": text_mask,
          "lang": np.int32(caption_lang(caption)), "id": np.int64(example_id)}


_HAN = re.compile(r"[\u3400-\u9fff]")


def caption_lang(caption: str) -> int:
  """1 (Chinese) for a caption with Han characters, else 0 (English): the language a captioner is
  told to write in (`bigvl.models.sycoca.LANGS`)."""
  return 1 if _HAN.search(caption) else 0


def _collate(examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  return {
      "image": np.stack([e["image"] for e in examples]),   # uint8: normalised on the device
      "text": np.stack([e["text"] for e in examples]),
      "text_mask": np.stack([e["text_mask"] for e in examples]),
      "lang": np.asarray([e["lang"] for e in examples], dtype=np.int32),
      "id": np.asarray([e["id"] for e in examples], dtype=np.int64),
  }


def train_dataset(files: Sequence[str] | Any, *, tokenizer: glm.GLMTokenizer,
                  image_size: int, batch_size: int, seed: int, block: int = 0,
                  blocks: int = 1, worker_count: int = 0, shuffle: bool = True,
                  num_epochs: int | None = None, max_skip_fraction: float = 1.0,
                  max_open_shards: int = stream.shards.DEFAULT_MAX_OPEN) -> grain.IterDataset:
  """The training stream of this reader's image-caption batches (`stream.train_stream`).

  Args:
    files: ArrayRecord shards; their order defines the global record index.
      Or any random-access source of record bytes (`len`, `[i]`), such as
      `bigvl.data.sources.VirtualSource`.
    tokenizer: text tokenizer (pickled into worker processes).
    image_size: square output size.
    batch_size, seed, block, blocks, worker_count, shuffle, num_epochs,
      max_skip_fraction, max_open_shards: as in `stream.train_stream`.

  Returns:
    A grain IterDataset; `iter()` gives a checkpointable `stream.TrainIterator`
    of {"image": uint8 (b,H,W,3) (the model normalises it), "text": i32 (b,L), "text_mask": i32
    (b,L), "id": i64 (b,)}.
  """
  parse = functools.partial(_parse, tokenizer=tokenizer, image_size=image_size, draft=True)
  return stream.train_stream(
      files, parse=parse, collate=_collate, reasons=REASONS, batch_size=batch_size, seed=seed,
      block=block, blocks=blocks, worker_count=worker_count, shuffle=shuffle,
      num_epochs=num_epochs, max_skip_fraction=max_skip_fraction,
      max_open_shards=max_open_shards)


def eval_examples(files: Sequence[str], *, tokenizer: glm.GLMTokenizer, image_size: int,
                  batch_size: int, block: int = 0,
                  blocks: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Every record once, in file order, as batches with a "valid" mask (`stream.eval_stream`).

  Block p reads records p, p + P, p + 2P, ...; padding and records that fail to decode come out
  invalid with id -1. No JPEG draft: evaluation sees the reference's pixels.
  """
  text, mask = tokenizer.encode("")  # A non-empty mask keeps attention finite.
  padding = {"image": np.zeros((image_size, image_size, 3), np.uint8),
             "text": text, "text_mask": mask, "lang": np.int32(0), "id": np.int64(-1)}
  parse = functools.partial(_parse, tokenizer=tokenizer, image_size=image_size, draft=False)
  return stream.eval_stream(files, parse=parse, collate=_collate, padding=padding,
                            batch_size=batch_size, block=block, blocks=blocks)


def eval_pixels(data: bytes, image_size: int) -> np.ndarray:
  """One encoded image -> uint8 (size, size, 3) as evaluation decodes it (no draft); the model
  normalises it on the device, bit-identical to `preprocess_image`."""
  return image_ops.decode_image(data, image_size, draft=False)


def preprocess_image(data: bytes, image_size: int) -> np.ndarray:
  """One encoded image -> float32 (size, size, 3) in [-1, 1], as in eval."""
  return image_ops.normalize(
      image_ops.decode_image(data, image_size, draft=False))


def load_examples(files: Sequence[str]) -> list[dict[str, Any]]:
  """All records of `files`, decoded but not preprocessed, in file order.

  Meant for small sets; a bad record raises RecordError naming its location.
  """
  out = []
  for file_index, path in enumerate(files):
    source = grain.sources.ArrayRecordDataSource([path])
    for i in range(len(source)):
      try:
        out.append(records.decode_record(source[i]))
      except records.RecordError as e:
        raise records.RecordError(
            f"file {file_index} ({path}) record {i}: {e}") from e
  return out
