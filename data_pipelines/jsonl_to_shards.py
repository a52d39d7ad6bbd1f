"""Converts a JSONL list of (image, caption) pairs into ArrayRecord shards.

Input: one JSON object per line,
  {"image": "path/to/img.jpg", "caption": "a dog on a beach"}
  {"image": "/abs/img.png", "captions": ["一只狗", "a dog"], "lang": "zh"}
Relative image paths are resolved against the JSONL file's folder.

Decisions:
  * ids are 1-based line numbers, so a record can always be traced back to its
    line (and skipped lines leave gaps rather than renumbering the rest).
  * "captions": [...] gives ONE record per image, caption = the first one and
    meta["captions"] = all of them. Duplicating the image per caption would
    multiply shard size and need made-up ids; a loader that wants caption
    sampling reads the list.
  * JPEG and PNG bytes are stored untouched unless image_size is set and the
    shorter side exceeds it; such images are downscaled to that shorter side
    (never upscaled) and re-encoded as JPEG quality 90, with EXIF rotation
    applied first since re-encoding drops it. Other formats (GIF, WebP, ...)
    are always re-encoded as JPEG, transparency flattened onto white.
  * Records are written round-robin over shards in input order, or in an order
    shuffled by `seed` (seed >= 0, the default) so that every shard is a random
    sample: a subset of shards is then an unbiased subset of the data.
  * The split lands in output_dir next to other splits; manifest.json records
    its parameters, including the input's SHA-256, and an identical re-run is
    reused unless forced.
  * Bad lines (malformed JSON, no image or caption, missing or undecodable
    image) are skipped and counted by reason, as training skips bad records;
    when more than `max_skip_fraction` of the lines are bad (a wrong base
    folder, a broken download) nothing is published and SkipFractionError
    names the commonest reason.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageOps

from bigvl.data.formats.records import encode_record
from data_pipelines import parallel, shard_writer

FORMAT = "bigvl.shards"
MAX_SKIPPED_EXAMPLES = 10
_HAN = re.compile(r"[\u3400-\u9fff]")


@dataclasses.dataclass
class Entry:
  line: int  # 1-based; also the record id.
  image: str  # As written in the JSONL.
  path: str  # Resolved.
  captions: list[str]
  lang: str | None


class SkipFractionError(ValueError):
  """More input lines were bad than allowed; `summary` is what would have been written."""

  def __init__(self, message: str, summary: dict[str, Any]):
    super().__init__(message)
    self.summary = summary


def _reason_kind(reason: str) -> str:
  # "missing file: /x.jpg" -> "missing file": reasons name their kind before the details.
  return reason.split(":", 1)[0]


def _guess_lang(text: str) -> str | None:
  if _HAN.search(text):
    return "zh"
  if text.isascii():
    return "en"
  return None


def parse_line(line_no: int, line: str, base: Path) -> Entry | str:
  """An Entry, or the reason the line is skipped."""
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    return f"malformed json line: {e.msg}"
  if not isinstance(obj, dict):
    return f"malformed json line: expected an object, got {type(obj).__name__}"
  image = obj.get("image")
  if not isinstance(image, str) or not image:
    return "missing 'image' field"
  raw = obj["captions"] if "captions" in obj else [obj.get("caption")]
  if not isinstance(raw, list):
    return "'captions' is not a list"
  captions = [c.strip() for c in raw if isinstance(c, str) and c.strip()]
  if not captions:
    return "empty caption"
  lang = obj.get("lang") if isinstance(obj.get("lang"), str) else _guess_lang(captions[0])
  path = image if os.path.isabs(image) else str(base / image)
  return Entry(line_no, image, path, captions, lang)


def load_image(path: str, image_size: int | None) -> bytes:
  """Encoded image bytes for a record; raises ValueError with a reason."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise ValueError(f"missing file: {path}") from None
  except OSError as e:
    raise ValueError(f"unreadable file: {path}: {e.strerror}") from None
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()  # Full decode: catches truncated files that open() accepts.
      fmt = img.format
      needs_resize = bool(image_size) and min(img.size) > image_size
      if fmt in ("JPEG", "PNG") and not needs_resize:
        return data
      img = ImageOps.exif_transpose(img)
      if img.mode != "RGB":
        # Transparent areas become white rather than black or garbage.
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
      if needs_resize:
        scale = image_size / min(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
      out = io.BytesIO()
      img.save(out, format="JPEG", quality=90)
      return out.getvalue()
  except Exception as e:  # PIL raises many unrelated types for bad files.
    raise ValueError(f"undecodable image: {path}: {type(e).__name__}: {e}") from None


def _process(args: tuple[Entry, int | None]) -> tuple[Entry, bytes | None, str | None]:
  entry, image_size = args
  try:
    return entry, load_image(entry.path, image_size), None
  except ValueError as e:
    return entry, None, str(e)


def _record(entry: Entry, image: bytes) -> bytes:
  meta: dict[str, Any] = {"source": entry.image}
  if len(entry.captions) > 1:
    meta["captions"] = entry.captions
  example: dict[str, Any] = {"id": entry.line, "image": image, "caption": entry.captions[0],
                             "meta": meta}
  if entry.lang:
    example["lang"] = entry.lang
  return encode_record(example)


def _processed(entries: list[Entry], image_size: int | None,
               num_workers: int) -> Iterator[tuple[Entry, bytes | None, str | None]]:
  tasks = [(e, image_size) for e in entries]
  if len(tasks) < 64:
    num_workers = 1  # Starting workers would cost more than the work.
  return parallel.imap(_process, tasks, num_workers, chunk_size=16)


def convert(input_path: str | os.PathLike, output_dir: str | os.PathLike, *,
            split: str = "train", num_shards: int = 1, image_size: int | None = None,
            seed: int = 0, num_workers: int | None = None,
            force: bool = False, max_skip_fraction: float = 1.0) -> dict[str, Any]:
  """Writes `split` shards for the JSONL at `input_path`; returns a summary.

  Summary keys: written, skipped, skipped_by_reason, skipped_examples (the
  first few, each with line and reason), split, output_dir, num_shards, reused.
  Raises SkipFractionError, publishing nothing, when more than
  `max_skip_fraction` of the non-blank lines are skipped.
  """
  input_path = Path(input_path)
  output_dir = Path(output_dir)
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  params = {
      "input": str(input_path.resolve()), "input_sha256": shard_writer.file_sha256(input_path),
      "num_shards": num_shards, "image_size": image_size or None, "seed": seed,
  }
  output_dir.mkdir(parents=True, exist_ok=True)
  existing = shard_writer.read_manifest(output_dir)
  if existing and existing.get("format") != FORMAT:
    raise FileExistsError(f"{output_dir} holds a {existing.get('format')!r} dataset")
  if existing and not force:
    entry = existing.get("splits", {}).get(split)
    if (entry and entry.get("params") == params
        and shard_writer.split_files_intact(output_dir, entry)):
      return _summary(entry, split, output_dir, reused=True)

  entries: list[Entry] = []
  skipped: list[dict[str, Any]] = []
  num_skipped = 0
  by_reason: collections.Counter[str] = collections.Counter()

  def skip(line: int, reason: str) -> None:
    # Keeps the lowest line numbers: image failures arrive in shuffled order.
    nonlocal num_skipped, skipped
    num_skipped += 1
    by_reason[_reason_kind(reason)] += 1
    skipped.append({"line": line, "reason": reason})
    if len(skipped) >= 2 * MAX_SKIPPED_EXAMPLES:
      skipped = sorted(skipped, key=lambda s: s["line"])[:MAX_SKIPPED_EXAMPLES]

  with open(input_path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8-sig")  # -sig: tolerate a byte-order mark.
      except UnicodeDecodeError:
        skip(line_no, "malformed json line: not UTF-8")
        continue
      if not line.strip():
        continue  # Blank lines (e.g. a trailing newline) are not data.
      parsed = parse_line(line_no, line, input_path.parent)
      if isinstance(parsed, str):
        skip(line_no, parsed)
      else:
        entries.append(parsed)
  if seed >= 0:
    order = np.random.default_rng(seed).permutation(len(entries))
    entries = [entries[i] for i in order]

  if num_workers is None:
    num_workers = parallel.default_num_workers()
  with shard_writer.staging_dir(output_dir / split) as staged:
    writers = [shard_writer.ShardWriter(staged / shard_writer.shard_filename(split, k, num_shards))
               for k in range(num_shards)]
    try:
      # Round-robin keeps shards within one record of each other without
      # knowing in advance how many images will fail to decode.
      written = 0
      for item, image, error in _processed(entries, image_size, num_workers):
        if error is not None:
          skip(item.line, error)
          continue
        writers[written % num_shards].write(_record(item, image))
        written += 1
    except BaseException:
      for w in writers:
        w.abort()
      raise
    infos = [w.close() for w in writers]
    skipped = sorted(skipped, key=lambda s: s["line"])[:MAX_SKIPPED_EXAMPLES]
    entry = shard_writer.split_entry(infos) | {
        "params": params, "skipped": num_skipped, "skipped_by_reason": dict(by_reason),
        "skipped_examples": skipped}
    total = entry["num_records"] + num_skipped
    if num_skipped > max_skip_fraction * total:
      worst, count = by_reason.most_common(1)[0]
      example = next(s for s in skipped if _reason_kind(s["reason"]) == worst)
      raise SkipFractionError(
          f"{num_skipped} of {total} lines skipped ({num_skipped / total:.0%}), more than "
          f"max_skip_fraction={max_skip_fraction}: mostly {worst!r} ({count}), e.g. line "
          f"{example['line']}: {example['reason']}; nothing was written",
          _summary(entry, split, output_dir, reused=False))
    shard_writer.publish_split(staged, output_dir, split, entry, FORMAT)
  return _summary(entry, split, output_dir, reused=False)


def _summary(entry: dict[str, Any], split: str, output_dir: Path, reused: bool) -> dict[str, Any]:
  return {
      "written": entry["num_records"],
      "skipped": entry["skipped"],
      "skipped_by_reason": entry.get("skipped_by_reason", {}),
      "skipped_examples": entry["skipped_examples"],
      "split": split,
      "output_dir": str(output_dir),
      "num_shards": len(entry["shards"]),
      "reused": reused,
  }
