"""Converts parquet files of (image, caption) rows into ArrayRecord shards.

Input columns (names set by the caller, launch/build_shards.py's flags):
  caption_column     a string or a list of strings (every caption kept)
  image_column       the encoded image: binary, or a struct with a "bytes" field as HuggingFace
                     datasets writes images ({"bytes": ..., "path": ...}; a row whose bytes are
                     null uses its path)
  image_path_column  instead of image_column: image file paths, relative ones resolved against
                     the parquet file's folder
  lang / langs       optional, used when present (as in `jsonl_to_shards`)
A file lacking a named column (or holding the wrong type in it) is refused before anything is
converted, naming the column and listing the ones present.

Everything else is `data_pipelines.jsonl_to_shards`'s core: the record layout (meta.source is
"<file>:row <r>", r the 0-based row of that file as pyarrow and pandas count, the file named
relative to the input files' common folder), caption and language rules, image handling, skip
accounting, staging, manifest and reuse. Here:
  * ids are a running index (1-based) over the rows of all files, in input order (files in the
    order given, a glob's sorted), so they are unique across the files; skipped rows leave gaps.
  * Rows are read in chunks of a row group by worker processes and dealt to shards in input
    order, each block of num_shards consecutive records in an order shuffled by `seed` (>= 0;
    -1: round-robin), as for tars.
  * The input digest for reuse is each file's path, size and modification time
    (`to_shards.stat_digest`), not a hash of its content.
  * Skip reasons: "missing caption", "empty caption", "malformed caption", "missing image" (a null
    image), "missing file" / "unreadable file" (a path pointing nowhere), "undecodable image",
    and "unreadable parquet: <file>: ..." for a file or row group pyarrow cannot read (a file
    whose footer is unreadable counts as one skip: its row count is unknown).
"""

from __future__ import annotations

import functools
import math
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipelines import jsonl_to_shards as core
from data_pipelines import parallel, to_shards

LANG_COLUMNS = ("langs", "lang")
MAX_CHUNK = 64


def _is_text(t: pa.DataType) -> bool:
  return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_bytes(t: pa.DataType) -> bool:
  return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def _type_error(schema: pa.Schema, caption_column: str, image_column: str,
                image_path_column: str) -> str | None:
  """Why these columns cannot be read as (image, caption) rows, or None."""
  names = schema.names
  present = ", ".join(names) or "none"
  def missing(column: str, flag: str) -> str:
    return f"has no column {column!r} (--{flag}); its columns: {present}"
  if caption_column not in names:
    return missing(caption_column, "caption_column")
  t = schema.field(caption_column).type
  if not (_is_text(t) or ((pa.types.is_list(t) or pa.types.is_large_list(t))
                          and _is_text(t.value_type))):
    return f"column {caption_column!r} (--caption_column) is {t}, not a string or a list of strings"
  if image_path_column:
    if image_path_column not in names:
      return missing(image_path_column, "image_path_column")
    t = schema.field(image_path_column).type
    if not _is_text(t):
      return f"column {image_path_column!r} (--image_path_column) is {t}, not a string (a path)"
    return None
  if image_column not in names:
    return missing(image_column, "image_column") + " (image paths: --image_path_column)"
  t = schema.field(image_column).type
  if pa.types.is_struct(t):
    fields = [t.field(i).name for i in range(t.num_fields)]
    if "bytes" not in fields or not _is_bytes(t.field("bytes").type):
      return (f"column {image_column!r} (--image_column) is a struct without a binary 'bytes' "
              f"field (fields: {', '.join(fields)})")
    return None
  if _is_text(t):
    return (f"column {image_column!r} (--image_column) holds strings, not image bytes: for paths "
            f"pass --image_path_column={image_column}")
  if not _is_bytes(t):
    return f"column {image_column!r} (--image_column) is {t}, not binary image bytes"
  return None


@functools.lru_cache(maxsize=2)
def _row_group(path: str, index: int, columns: tuple[str, ...]) -> list[dict[str, Any]]:
  # Cached: consecutive chunks of a row group often reach the same worker.
  return pq.ParquetFile(path).read_row_group(index, columns=list(columns)).to_pylist()


def _image(row: dict[str, Any], image_column: str, image_path_column: str, base: str,
           where: str, image_size: int | None) -> bytes:
  """The record's image bytes for one row; raises ValueError with the reason."""
  def from_path(p: Any) -> bytes:
    if not isinstance(p, str) or not p:
      raise ValueError(f"missing image: no path in {image_path_column or image_column!r}")
    p = p if os.path.isabs(p) else os.path.join(base, p)
    return core.load_image(p, image_size)

  if image_path_column:
    return from_path(row[image_path_column])
  value = row[image_column]
  if isinstance(value, dict):  # HuggingFace's {"bytes": ..., "path": ...}
    if value.get("bytes") is None:
      if value.get("path"):
        return from_path(value["path"])
      raise ValueError(f"missing image: {image_column!r} is null")
    value = value["bytes"]
  if value is None:
    raise ValueError(f"missing image: {image_column!r} is null")
  return core.encode_image(bytes(value), image_size, where)


def _process(task: tuple) -> list[core.Outcome]:
  """One unit of work: a chunk of a row group's rows, or an unreadable file's one skip."""
  if task[0] == "broken":
    _, order, where, reason = task
    return [core.Outcome(order, where, None, reason)]
  (_, path, name, group, start, stop, first_row, first_id, columns, caption_column, image_column,
   image_path_column, lang_column, image_size) = task
  base = os.path.dirname(os.path.abspath(path))
  sources = [f"{name}:row {first_row + i}" for i in range(stop - start)]
  try:
    rows = _row_group(path, group, columns)[start:stop]
  except Exception as e:  # pyarrow raises its own types (ArrowInvalid, OSError, ...)
    reason = f"unreadable parquet: {name}: row group {group}: {type(e).__name__}: {e}"
    return [core.Outcome(first_id + i, {"source": s, "id": first_id + i}, None, reason)
            for i, s in enumerate(sources)]
  out = []
  for i, (row, source) in enumerate(zip(rows, sources)):
    record_id = first_id + i
    where = {"source": source, "id": record_id}
    captions = core.clean_captions(row[caption_column])
    if isinstance(captions, str):
      out.append(core.Outcome(record_id, where, None, captions))
      continue
    try:
      image = _image(row, image_column, image_path_column, base, source, image_size)
    except ValueError as e:
      out.append(core.Outcome(record_id, where, None, str(e)))
      continue
    langs = core.caption_langs(captions, row[lang_column] if lang_column else None)
    out.append(core.Outcome(record_id, where,
                            core.make_record(record_id, image, captions, langs, source), None))
  return out


def _plan(files: list[str], names: list[str], caption_column: str, image_column: str,
          image_path_column: str) -> list[tuple]:
  """Per file: its row groups' sizes and the columns to read, or why it cannot be read. Raises
  ValueError for a file lacking a column (before any conversion)."""
  plans = []
  for path, name in zip(files, names):
    try:
      pf = pq.ParquetFile(path)
      schema = pf.schema_arrow
      groups = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
    except Exception as e:  # a truncated or non-parquet file: pyarrow's ArrowInvalid, OSError, ...
      plans.append(("broken", path, name, f"{type(e).__name__}: {e}"))
      continue
    error = _type_error(schema, caption_column, image_column, image_path_column)
    if error:
      raise ValueError(f"{path} {error}")
    lang = next((c for c in LANG_COLUMNS if c in schema.names), "")
    columns = tuple(dict.fromkeys(c for c in (caption_column, image_path_column or image_column,
                                              lang) if c))
    plans.append(("ok", path, name, groups, columns, lang))
  return plans


def convert(files: list[str], output_dir: str | os.PathLike, *, caption_column: str = "caption",
            image_column: str = "image", image_path_column: str = "", split: str = "train",
            num_shards: int = 1, image_size: int | None = None, seed: int = 0,
            num_workers: int | None = None, force: bool = False,
            max_skip_fraction: float = 1.0) -> dict[str, Any]:
  """Writes `split` shards for the parquet `files` (in this order); returns the summary of
  `jsonl_to_shards.convert` (skipped_examples name the row: {"source": "<file>:row <r>", "id",
  "reason"}). Raises ValueError for a file lacking a named column, SkipFractionError (publishing
  nothing) when more than `max_skip_fraction` of the rows are skipped."""
  start = time.monotonic()
  output_dir = Path(output_dir)
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  if not files:
    raise ValueError("no input parquet files")
  names = to_shards.display_names(files)
  plans = _plan(files, names, caption_column, image_column, image_path_column)
  params = to_shards.build_params(
      "parquet", files, num_shards=num_shards, image_size=image_size, seed=seed,
      layout=core.LAYOUT, caption_column=caption_column,
      image_column="" if image_path_column else image_column,
      image_path_column=image_path_column)
  done = core.reusable(output_dir, split, params, force, start)
  if done is not None:
    return done
  if num_workers is None:
    num_workers = parallel.default_num_workers()
  total_rows = sum(sum(p[3]) for p in plans if p[0] == "ok")
  chunk = max(1, min(MAX_CHUNK, math.ceil(total_rows / (4 * max(1, num_workers)))))
  tasks = []
  next_id = 1
  for plan in plans:
    if plan[0] == "broken":
      _, path, name, error = plan
      tasks.append(("broken", next_id, {"source": name}, f"unreadable parquet: {name}: {error}"))
      continue
    _, path, name, groups, columns, lang = plan
    first_row = 0
    for group, num_rows in enumerate(groups):
      for lo in range(0, num_rows, chunk):
        hi = min(num_rows, lo + chunk)
        tasks.append(("rows", path, name, group, lo, hi, first_row + lo, next_id + first_row + lo,
                      columns, caption_column, image_column, image_path_column, lang, image_size))
      first_row += num_rows
    next_id += first_row
  if len(tasks) < 2:
    num_workers = 1
  outcomes = (o for results in parallel.imap(_process, tasks, num_workers) for o in results)
  return core.write_split(output_dir, split, num_shards, params, outcomes, core.Skips(),
                          max_skip_fraction=max_skip_fraction, start=start,
                          deal_seed=seed, noun="rows")
