"""(image, caption) pairs in any supported input format -> ArrayRecord shards.

`--input` of launch/build_shards.py, as `convert(spec, ...)` takes it:
  pairs.jsonl                         one JSON-lines file (data_pipelines.jsonl_to_shards)
  /data/00000.tar                     webdataset tars as img2dataset writes them
  /data/{00000..00099}.tar            (data_pipelines.webdataset_to_shards): a brace range keeps
                                      its zero padding; several groups, and {a,b} lists, expand
  '/data/*.tar'                       a glob (sorted)
  a.tar,b.tar                         a comma-separated list of any of these
  /data/part-*.parquet                parquet files (data_pipelines.parquet_to_shards)
The format is each file's extension (.tar -> webdataset, .parquet -> parquet, anything else ->
jsonl) unless `input_format` says; one build reads one format, and JSON lines one file.

Several tars or parquet files are one input: record ids are a running index over all their
samples in input order (the files in the order given, a glob's sorted), unique across them.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from typing import Any

FORMATS = ("jsonl", "webdataset", "parquet")
_GLOB_CHARS = re.compile(r"[*?\[]")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?")


def _split_commas(spec: str) -> list[str]:
  """Splits on commas outside braces ("a.tar,{b,c}.tar" -> ["a.tar", "{b,c}.tar"])."""
  parts, depth, cur = [], 0, []
  for ch in spec:
    if ch == "," and depth == 0:
      parts.append("".join(cur))
      cur = []
      continue
    depth += ch == "{"
    depth -= ch == "}" and depth > 0
    cur.append(ch)
  parts.append("".join(cur))
  return [p.strip() for p in parts if p.strip()]


def _range_values(a: str, b: str, step: str | None) -> list[str]:
  lo, hi = int(a), int(b)
  inc = abs(int(step)) if step else 1
  if inc == 0:
    raise ValueError(f"--input: brace range {{{a}..{b}..{step}}} has step 0")
  values = range(lo, hi + 1, inc) if lo <= hi else range(lo, hi - 1, -inc)
  padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (a, b))
  width = max(len(a), len(b)) if padded else 0
  return [f"{v:0{width}d}" for v in values]


def expand_braces(pattern: str) -> list[str]:
  """Shell-style brace expansion: {00000..00099} (zero padding kept, as bash does when either end
  has a leading zero), {1..9..2}, {a,b,c}; every group expands, left to right."""
  m = _BRACE.search(pattern)
  if m is None:
    return [pattern]
  body = m.group(1)
  r = _RANGE.fullmatch(body)
  if r:
    values = _range_values(*r.groups())
  elif "," in body:
    values = body.split(",")
  else:
    # Not an expansion ("{x}" is literal in bash too); keep it, expand what follows.
    head, tail = pattern[:m.end()], pattern[m.end():]
    return [head + rest for rest in expand_braces(tail)]
  head, tail = pattern[:m.start()], pattern[m.end():]
  return [p for v in values for p in expand_braces(head + v + tail)]


def expand_input(spec: str) -> list[str]:
  """The files `spec` names, in order, each once. Raises ValueError naming a pattern that matches
  nothing (a glob) or a file that does not exist (a plain path or a brace expansion). A spec
  that is itself an existing file is that file, whatever characters its name holds."""
  if os.path.isfile(os.path.expanduser(spec)):
    return [os.path.expanduser(spec)]
  files: list[str] = []
  for part in _split_commas(spec):
    for pattern in expand_braces(part):
      pattern = os.path.expanduser(pattern)
      if _GLOB_CHARS.search(pattern):
        matched = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
        if not matched:
          raise ValueError(f"--input: {pattern!r} matches no file")
        files += matched
      elif os.path.isfile(pattern):
        files.append(pattern)
      else:
        what = "is a directory, not a file" if os.path.isdir(pattern) else "does not exist"
        where = f" (from {part!r})" if pattern != part else ""
        raise ValueError(f"--input: {pattern}{where} {what}")
  if not files:
    raise ValueError(f"--input={spec!r} names no file")
  seen: set[str] = set()
  out = []
  for f in files:
    key = os.path.realpath(f)
    if key not in seen:
      seen.add(key)
      out.append(f)
  return out


def detect_format(files: list[str], input_format: str | None = None) -> str:
  """"jsonl", "webdataset" or "parquet": `input_format` if given, else from the extensions."""
  if input_format:
    if input_format not in FORMATS:
      raise ValueError(f"--input_format={input_format!r}: use one of {', '.join(FORMATS)}")
    return input_format
  kinds = {"webdataset" if f.lower().endswith(".tar") else
           "parquet" if f.lower().endswith(".parquet") else "jsonl" for f in files}
  if len(kinds) > 1:
    raise ValueError(f"--input mixes formats ({', '.join(sorted(kinds))}): convert each into its "
                     "own --split, or pass --input_format")
  return kinds.pop()


def stat_digest(files: list[str]) -> str:
  """SHA-256 over each file's resolved path, size and modification time (not its content: a
  set of tars can be terabytes, and re-reading them all to decide whether a build can be reused
  would cost as much as rebuilding). A file rewritten in place changes its mtime; a copy made
  without keeping mtimes is rebuilt once."""
  h = hashlib.sha256()
  for f in files:
    st = os.stat(f)
    h.update(f"{os.path.realpath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return h.hexdigest()


def build_params(input_format: str, files: list[str], *, num_shards: int,
                 image_size: int | None, seed: int, layout: int, **extra: Any) -> dict[str, Any]:
  """What identifies a build of many input files (for reusing an identical one): the format, the
  files (their sizes and modification times), the flags, the record layout."""
  return {"input_format": input_format, "input": describe_files(files),
          "input_files": len(files), "input_digest": stat_digest(files), **extra,
          "num_shards": num_shards, "image_size": image_size or None, "seed": seed,
          "layout": layout}


def describe_files(files: list[str]) -> str:
  """The input as the manifest's params record it: one resolved path, or the first and last."""
  first = os.path.realpath(files[0])
  if len(files) == 1:
    return first
  return f"{first} .. {os.path.realpath(files[-1])} ({len(files)} files)"


def display_names(files: list[str]) -> list[str]:
  """Short names for `meta.source` and skipped examples: paths relative to the files' common
  folder (for files of one folder, their basenames)."""
  real = [os.path.abspath(f) for f in files]
  common = os.path.commonpath([os.path.dirname(f) for f in real])
  return [os.path.relpath(f, common) for f in real]


def convert(spec: str, output_dir: str | os.PathLike, *, input_format: str | None = None,
            caption_column: str = "caption", image_column: str = "image",
            image_path_column: str = "", **kwargs: Any) -> dict[str, Any]:
  """Converts the input `spec` names (see the module docstring) into `output_dir`'s split;
  `kwargs` are the converters' own (split, num_shards, image_size, seed, num_workers, force,
  max_skip_fraction). Returns the summary, with "input_format" and "input_files" added."""
  files = expand_input(spec)
  fmt = detect_format(files, input_format)
  if fmt == "jsonl":
    from data_pipelines import jsonl_to_shards
    if len(files) > 1:
      raise ValueError(f"--input names {len(files)} JSON-lines files ({files[0]}, ...): their "
                       "line numbers (the ids) would collide; convert one file at a time, "
                       "each into its own --split or --output_dir")
    summary = jsonl_to_shards.convert(files[0], output_dir, **kwargs)
  elif fmt == "webdataset":
    from data_pipelines import webdataset_to_shards
    summary = webdataset_to_shards.convert(files, output_dir, **kwargs)
  else:
    from data_pipelines import parquet_to_shards
    summary = parquet_to_shards.convert(
        files, output_dir, caption_column=caption_column, image_column=image_column,
        image_path_column=image_path_column, **kwargs)
  return summary | {"input_format": fmt, "input_files": len(files)}
