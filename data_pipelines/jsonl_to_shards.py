"""Converts (image, caption) pairs into ArrayRecord shards: the JSONL reader, and the core that
every input format shares (`data_pipelines.webdataset_to_shards`,
`data_pipelines.parquet_to_shards`; `data_pipelines.to_shards` picks one from `--input`).

JSONL input: one JSON object per line,
  {"image": "path/to/img.jpg", "caption": "a dog on a beach"}
  {"image": "/abs/img.png", "captions": ["一只狗", "a dog"], "lang": "zh"}
Relative image paths are resolved against the JSONL file's folder.

The record written (`bigvl.data.formats.records`), whatever the input format:
  id       int    JSONL: the 1-based line number; tars and parquet: a global running index
                  (1-based) over all samples of all input files, in input order
  image    bytes  the encoded image (see below)
  caption  str    the first caption
  lang     str    the first caption's language, when known
  meta     map    source: where the sample came from (JSONL: the image path as written; a tar:
                  "shard-00003.tar:000031234", the member key; parquet: "file.parquet:row 17");
                  captions: every caption, and langs: one tag (or None) per caption in the same
                  order, both only when there is more than one caption

Decisions:
  * ids trace a record back to its sample, and skipped samples leave gaps rather than renumbering
    the rest.
  * A caption is a string or a list of strings (as in M²-Encoder's `"caption": [...]`); every
    non-empty one is kept, trimmed of surrounding whitespace only, so text in any language
    survives byte for byte. ONE record per image: caption = the first one and meta["captions"] =
    all of them. Duplicating the image per caption would multiply shard size and need made-up
    ids; a loader that wants caption sampling reads the list.
  * Languages: a sample's own `lang` string is the FIRST caption's language (the record's
    `lang` has always meant that: ["一只狗", "a dog"] with "lang": "zh"); a `lang` or `langs`
    list as long as the captions gives one per caption. Any caption still untagged is guessed
    (`_guess_lang`: Han characters -> "zh", all ASCII -> "en", else None).
  * JPEG and PNG bytes are stored untouched unless image_size is set and the
    shorter side exceeds it; such images are downscaled to that shorter side
    (never upscaled) and re-encoded as JPEG quality 90, with EXIF rotation
    applied first since re-encoding drops it. Other formats (GIF, WebP, ...)
    are always re-encoded as JPEG. Every mode becomes RGB as training and evaluation decode
    it (`bigvl.data.image_ops.to_rgb`: 16-bit scaled, transparency composed onto white), so a
    kept PNG and a re-encoded one give the same pixels. `encode_image` does this for bytes
    (tars, parquet), `load_image` for a file.
  * JSONL records are written round-robin over shards in input order, or in an order
    shuffled by `seed` (seed >= 0, the default) so that every shard is a random
    sample: a subset of shards is then an unbiased subset of the data. (Tars and parquet stream
    instead: see `write_split`'s `deal_seed`.)
  * The split lands in output_dir next to other splits; manifest.json records
    its parameters, including a digest of the input (JSONL: its SHA-256), and an identical
    re-run is reused unless forced.
  * Bad samples (malformed JSON, no image or caption, missing or undecodable
    image, ...) are skipped and counted by reason, as training skips bad records;
    when more than `max_skip_fraction` of the samples are bad (a wrong base
    folder, a broken download) nothing is published and SkipFractionError
    names the commonest reason.
  * Images are read and re-encoded in worker processes (`data_pipelines.parallel`); the summary
    says how long the build took and how many images per second it wrote.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

import numpy as np
from PIL import Image, ImageOps

from bigvl.data import image_ops
from bigvl.data.formats.records import encode_record
from data_pipelines import parallel, shard_writer

FORMAT = "bigvl.shards"
MAX_SKIPPED_EXAMPLES = 10
# Bumped when the records written for the same input change (2: meta["langs"]), so that a build
# made before is rebuilt rather than reused.
LAYOUT = 2
_HAN = re.compile(r"[\u3400-\u9fff]")


@dataclasses.dataclass
class Entry:
  line: int  # 1-based; also the record id.
  image: str  # As written in the JSONL.
  path: str  # Resolved.
  captions: list[str]
  lang: str | None  # The first caption's.
  langs: list[str | None] = dataclasses.field(default_factory=list)  # One per caption.

  def __post_init__(self) -> None:
    if not self.langs:
      self.langs = caption_langs(self.captions, self.lang)
      self.lang = self.langs[0]


class Outcome(NamedTuple):
  """One sample, converted: its record, or the reason it was skipped."""
  order: int             # position in input order (the id, or the JSONL line)
  where: dict[str, Any]  # how skipped_examples name it: {"line": n} or {"source": ..., "id": n}
  record: bytes | None
  reason: str | None


class SkipFractionError(ValueError):
  """More input samples were bad than allowed; `summary` is what would have been written."""

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


def clean_captions(raw: Any) -> list[str] | str:
  """The non-empty captions of a string or a list of strings (trimmed of surrounding whitespace
  only; other list items are dropped), or the reason there are none."""
  if raw is None:
    return "missing caption"
  if isinstance(raw, str):
    raw = [raw]
  elif not isinstance(raw, (list, tuple)):
    return f"malformed caption: a {type(raw).__name__}, not a string or a list of strings"
  captions = [c.strip() for c in raw if isinstance(c, str) and c.strip()]
  return captions or "empty caption"


def given_lang(obj: dict[str, Any]) -> Any:
  """What a sample says of its captions' languages: its "langs" list, else its "lang"."""
  return obj["langs"] if isinstance(obj.get("langs"), list) else obj.get("lang")


def caption_langs(captions: list[str], given: Any = None) -> list[str | None]:
  """One language tag per caption: `given` as a string is the first caption's, as a list of the
  captions' length one per caption; the rest are guessed (`_guess_lang`)."""
  if isinstance(given, (list, tuple)) and len(given) == len(captions):
    tags = [g if isinstance(g, str) and g else None for g in given]
  else:
    tags = [None] * len(captions)
    if isinstance(given, str) and given:
      tags[0] = given
  return [t if t is not None else _guess_lang(c) for t, c in zip(tags, captions)]


def make_record(record_id: int, image: bytes, captions: list[str], langs: list[str | None],
                source: str) -> bytes:
  """The record layout every format writes (see the module docstring)."""
  meta: dict[str, Any] = {"source": source}
  if len(captions) > 1:
    meta["captions"] = captions
    meta["langs"] = langs
  example: dict[str, Any] = {"id": record_id, "image": image, "caption": captions[0],
                             "meta": meta}
  if langs[0]:
    example["lang"] = langs[0]
  return encode_record(example)


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
  # "caption" may be a string or, as in the reference M²-Encoder format, a list.
  raw = obj["captions"] if "captions" in obj else obj.get("caption")
  if "captions" in obj and not isinstance(raw, list):
    return "'captions' is not a list"
  captions = clean_captions(raw)
  if isinstance(captions, str):
    return "empty caption"
  langs = caption_langs(captions, given_lang(obj))
  path = image if os.path.isabs(image) else str(base / image)
  return Entry(line_no, image, path, captions, langs[0], langs)


def encode_image(data: bytes, image_size: int | None, name: str = "image") -> bytes:
  """Encoded image bytes for a record from an encoded image (see the module docstring); raises
  ValueError("undecodable image: <name>: ...")."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()  # Full decode: catches truncated files that open() accepts.
      fmt = img.format
      needs_resize = bool(image_size) and min(img.size) > image_size
      if fmt in ("JPEG", "PNG") and not needs_resize:
        return data
      img = image_ops.to_rgb(ImageOps.exif_transpose(img))   # as training decodes kept bytes
      if needs_resize:
        scale = image_size / min(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
      out = io.BytesIO()
      img.save(out, format="JPEG", quality=90)
      return out.getvalue()
  except Exception as e:  # PIL raises many unrelated types for bad files.
    raise ValueError(f"undecodable image: {name}: {type(e).__name__}: {e}") from None


def read_image_file(path: str) -> bytes:
  """A file's bytes; raises ValueError("missing file: ..." / "unreadable file: ...")."""
  try:
    with open(path, "rb") as f:
      return f.read()
  except (FileNotFoundError, NotADirectoryError):
    raise ValueError(f"missing file: {path}") from None
  except OSError as e:
    raise ValueError(f"unreadable file: {path}: {e.strerror}") from None


def load_image(path: str, image_size: int | None) -> bytes:
  """Encoded image bytes for a record from an image file; raises ValueError with a reason."""
  return encode_image(read_image_file(path), image_size, path)


def _process(args: tuple[Entry, int | None]) -> Outcome:
  entry, image_size = args
  where = {"line": entry.line}
  try:
    image = load_image(entry.path, image_size)
  except ValueError as e:
    return Outcome(entry.line, where, None, str(e))
  return Outcome(entry.line, where,
                 make_record(entry.line, image, entry.captions, entry.langs, entry.image), None)


class Skips:
  """Skipped samples: counted by reason, the first few (in input order) kept as examples."""

  def __init__(self) -> None:
    self.count = 0
    self.by_reason: collections.Counter[str] = collections.Counter()
    self._examples: list[tuple[int, dict[str, Any]]] = []

  def add(self, order: int, where: dict[str, Any], reason: str) -> None:
    # Keeps the earliest samples: image failures may arrive out of input order.
    self.count += 1
    self.by_reason[_reason_kind(reason)] += 1
    self._examples.append((order, where | {"reason": reason}))
    if len(self._examples) >= 2 * MAX_SKIPPED_EXAMPLES:
      self._examples = self._sorted()

  def _sorted(self) -> list[tuple[int, dict[str, Any]]]:
    return sorted(self._examples, key=lambda s: s[0])[:MAX_SKIPPED_EXAMPLES]

  def examples(self) -> list[dict[str, Any]]:
    return [e for _, e in self._sorted()]


def reusable(output_dir: Path, split: str, params: dict[str, Any], force: bool,
             start: float) -> dict[str, Any] | None:
  """The summary of an identical earlier build of `split` in `output_dir`, if one is intact.

  Creates output_dir; raises FileExistsError if it holds another kind of dataset."""
  output_dir.mkdir(parents=True, exist_ok=True)
  existing = shard_writer.read_manifest(output_dir)
  if existing and existing.get("format") != FORMAT:
    raise FileExistsError(f"{output_dir} holds a {existing.get('format')!r} dataset")
  if existing and not force:
    entry = existing.get("splits", {}).get(split)
    if (entry and entry.get("params") == params
        and shard_writer.split_files_intact(output_dir, entry)):
      return _summary(entry, split, output_dir, reused=True, start=start)
  return None


def _dealer(num_shards: int, seed: int | None) -> Iterator[int]:
  """Shard indices for consecutive records: round-robin, or (seed >= 0) each block of num_shards
  records dealt to the shards in a seeded random order."""
  if seed is None or seed < 0:
    while True:
      yield from range(num_shards)
  rng = np.random.default_rng(seed)
  while True:
    yield from rng.permutation(num_shards).tolist()


def write_split(output_dir: Path, split: str, num_shards: int, params: dict[str, Any],
                outcomes: Iterable[Outcome], skips: Skips, *, max_skip_fraction: float,
                start: float, deal_seed: int | None = None, noun: str = "samples",
                describe=None) -> dict[str, Any]:
  """The core every format shares: writes the records of `outcomes` (counting the skipped ones
  in `skips`, which may already hold some) to `split`'s shards, staged and then published with
  its manifest entry, unless more than `max_skip_fraction` of the samples were skipped
  (SkipFractionError, nothing published). Returns the summary.

  Shards stay within one record of each other without knowing in advance how many samples fail:
  records are dealt round-robin, or with `deal_seed` >= 0 each block of num_shards consecutive
  records goes to the shards in a seeded random order (every shard then holds a random, evenly
  spread sample of a streamed input that was never held in memory). `describe(where)` names a
  skipped sample in the error ("line 6"; default: its source).
  """
  if describe is None:
    describe = lambda w: f"line {w['line']}" if "line" in w else str(w.get("source"))  # noqa: E731
  with shard_writer.staging_dir(output_dir / split) as staged:
    writers = [shard_writer.ShardWriter(staged / shard_writer.shard_filename(split, k, num_shards))
               for k in range(num_shards)]
    try:
      deal = _dealer(num_shards, deal_seed)
      for outcome in outcomes:
        if outcome.reason is not None:
          skips.add(outcome.order, outcome.where, outcome.reason)
          continue
        writers[next(deal)].write(outcome.record)
    except BaseException:
      for w in writers:
        w.abort()
      raise
    infos = [w.close() for w in writers]
    examples = skips.examples()
    entry = shard_writer.split_entry(infos) | {
        "params": params, "skipped": skips.count, "skipped_by_reason": dict(skips.by_reason),
        "skipped_examples": examples}
    total = entry["num_records"] + skips.count
    if skips.count > max_skip_fraction * total:
      worst, count = skips.by_reason.most_common(1)[0]
      example = next(s for s in examples if _reason_kind(s["reason"]) == worst)
      raise SkipFractionError(
          f"{skips.count} of {total} {noun} skipped ({skips.count / total:.0%}), more than "
          f"max_skip_fraction={max_skip_fraction}: mostly {worst!r} ({count}), e.g. "
          f"{describe(example)}: {example['reason']}; nothing was written",
          _summary(entry, split, output_dir, reused=False, start=start))
    shard_writer.publish_split(staged, output_dir, split, entry, FORMAT)
  return _summary(entry, split, output_dir, reused=False, start=start)


def _processed(entries: list[Entry], image_size: int | None,
               num_workers: int) -> Iterator[Outcome]:
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
  first few, each with line and reason), split, output_dir, num_shards, reused,
  seconds, images_per_s (records written per second of wall time; 0 when reused).
  Raises SkipFractionError, publishing nothing, when more than
  `max_skip_fraction` of the non-blank lines are skipped.
  """
  start = time.monotonic()
  input_path = Path(input_path)
  output_dir = Path(output_dir)
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  params = {
      "input": str(input_path.resolve()), "input_sha256": shard_writer.file_sha256(input_path),
      "num_shards": num_shards, "image_size": image_size or None, "seed": seed, "layout": LAYOUT,
  }
  done = reusable(output_dir, split, params, force, start)
  if done is not None:
    return done

  entries: list[Entry] = []
  skips = Skips()
  with open(input_path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8-sig")  # -sig: tolerate a byte-order mark.
      except UnicodeDecodeError:
        skips.add(line_no, {"line": line_no}, "malformed json line: not UTF-8")
        continue
      if not line.strip():
        continue  # Blank lines (e.g. a trailing newline) are not data.
      parsed = parse_line(line_no, line, input_path.parent)
      if isinstance(parsed, str):
        skips.add(line_no, {"line": line_no}, parsed)
      else:
        entries.append(parsed)
  if seed >= 0:
    order = np.random.default_rng(seed).permutation(len(entries))
    entries = [entries[i] for i in order]

  if num_workers is None:
    num_workers = parallel.default_num_workers()
  return write_split(output_dir, split, num_shards, params,
                     _processed(entries, image_size, num_workers), skips,
                     max_skip_fraction=max_skip_fraction, start=start, noun="lines")


def _summary(entry: dict[str, Any], split: str, output_dir: Path, reused: bool,
             start: float | None = None) -> dict[str, Any]:
  seconds = time.monotonic() - start if start is not None else 0.0
  return {
      "written": entry["num_records"],
      "skipped": entry["skipped"],
      "skipped_by_reason": entry.get("skipped_by_reason", {}),
      "skipped_examples": entry["skipped_examples"],
      "split": split,
      "output_dir": str(output_dir),
      "num_shards": len(entry["shards"]),
      "reused": reused,
      "seconds": round(seconds, 3),
      # What this run wrote: a reused build wrote nothing.
      "images_per_s": 0.0 if reused else round(entry["num_records"] / max(seconds, 1e-9), 1),
  }
