"""Converts webdataset tars, as img2dataset writes them, into ArrayRecord shards.

Input: uncompressed tars whose members are grouped into samples by key (the member name up to the
first dot of its basename, as webdataset does), per sample
  {key}.jpg   the image (or .jpeg, .png, .webp; the first of these present is used)
  {key}.txt   the caption
  {key}.json  metadata: may hold "caption" (a string or a list of strings) or "captions" (a
              list), "lang" / "langs"; other keys (url, width, ...) are ignored
Other members are ignored. Captions: a list in the .json wins (every caption kept), else the
.txt, else a string "caption" in the .json.

Everything else is `data_pipelines.jsonl_to_shards`'s core: the record layout (meta.source is
"<tar>:<key>", the tar named relative to the input files' common folder), caption and language
rules, image handling (`encode_image`), skip accounting, staging, manifest and reuse. Here:
  * ids are a running index (1-based) over the samples of all tars, in input order (tars in the
    order given, a glob's sorted; samples in tar order), so they are unique across the tars;
    skipped samples leave gaps.
  * The tars are streamed, never held in memory: each one's headers are listed (in this
    process, ahead of the workers), then chunks of its samples are read by offset and converted
    in worker processes.
    Records are dealt to shards in input order, each block of num_shards consecutive records in
    an order shuffled by `seed` (>= 0; -1: round-robin), so each shard is an evenly spread random
    sample of the input (training shuffles records globally anyway).
  * The input digest for reuse is each tar's path, size and modification time
    (`to_shards.stat_digest`), not a hash of its content: re-reading terabytes to decide whether
    to rebuild would cost as much as the rebuild.
  * Skip reasons: "missing image" (a .txt/.json without an image), "missing caption",
    "empty caption", "undecodable caption" (a .txt that is not UTF-8), "malformed json" (a bad
    {key}.json), "undecodable image", and "unreadable tar: <file>: ..." for a corrupt or
    truncated tar: the samples listed before the damage are converted (a sample whose member the
    file cuts short is not); everything after counts as ONE skip (how many samples were lost
    is unknowable).
"""

from __future__ import annotations

import json
import math
import os
import tarfile
import time
from pathlib import Path
from typing import Any, Iterator

from data_pipelines import jsonl_to_shards as core
from data_pipelines import parallel, to_shards

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_MEMBER_EXTS = IMAGE_EXTS + ("txt", "json")

Members = dict[str, tuple[int, int]]  # extension -> (offset of the data, size)


def _split_name(name: str) -> tuple[str, str]:
  folder, base = os.path.split(name)
  stem, _, ext = base.partition(".")
  return os.path.join(folder, stem) if folder else stem, ext.lower()


def _fast_listing(path: str, size: int) -> list[tuple[str, int, int]] | None:
  """(name, offset of the data, size) of a plain ustar tar's regular files, reading each 512-byte
  header directly (~20x faster than tarfile, which matters when listing 10,000-sample tars would
  otherwise keep the workers waiting); None at anything unusual (pax or GNU long-name headers, a
  bad checksum, a truncated file), which `tarfile` then reads."""
  out = []
  offset = 0
  with open(path, "rb") as f:
    while True:
      f.seek(offset)
      header = f.read(tarfile.BLOCKSIZE)
      if not header.strip(b"\0"):
        return out if len(header) in (0, tarfile.BLOCKSIZE) else None  # the end, or a stub
      if len(header) < tarfile.BLOCKSIZE or header[124] & 0x80:  # truncated, base-256 size
        return None
      try:
        checksum = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        length = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
      except ValueError:
        return None
      if checksum != sum(header[:148]) + 256 + sum(header[156:]):
        return None
      kind = header[156:157]
      if kind not in (b"0", b"\0", b"7", b"1", b"2", b"3", b"4", b"5", b"6"):
        return None  # pax (x, g), GNU long names (L, K), sparse files, ...
      data = offset + tarfile.BLOCKSIZE
      if kind in (b"0", b"\0", b"7"):
        name = header[0:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar" and header[345:500].strip(b"\0"):
          name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        if data + length > size:
          return None
        try:
          out.append((name.decode("utf-8"), data, length))
        except UnicodeDecodeError:
          return None
      else:
        length = 0  # links, devices, directories carry no data
      offset = data + -(-length // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _tarfile_listing(path: str, size: int) -> tuple[list[tuple[str, int, int]], str | None, bool]:
  """What `tarfile` can list of a tar, the error that stopped it early (None: intact), and
  whether the last member listed is cut short (its data runs past the end of the file)."""
  out = []
  error = None
  cut = False
  try:
    with tarfile.open(path, "r:") as tf:
      while True:
        try:
          member = tf.next()
        except (tarfile.TarError, EOFError, OSError) as e:
          error = f"{type(e).__name__}: {e}"
          break
        if member is None:
          break
        if not member.isfile():
          continue
        if member.offset_data + member.size > size:
          out.append((member.name, member.offset_data, member.size))
          error = f"truncated: {member.name} needs {member.size} bytes, the file ends first"
          cut = True
          break
        out.append((member.name, member.offset_data, member.size))
      end = tf.offset
    if error is None:
      # tarfile ends its listing without a word at a damaged header after the first one.
      with open(path, "rb") as f:
        f.seek(end)
        block = f.read(tarfile.BLOCKSIZE)
      if block.strip(b"\0"):
        error = f"bad tar header at byte {end}"
  except (tarfile.TarError, EOFError, OSError) as e:
    error = f"{type(e).__name__}: {e}"
  return out, error, cut


def scan_tar(path: str) -> tuple[list[tuple[str, Members]], str | None]:
  """The samples of a tar (key -> where each member's data lies), in tar order, and the error
  that stopped the listing early (None for an intact tar). Reads headers only."""
  try:
    size = os.path.getsize(path)
    listing = _fast_listing(path, size)
  except OSError as e:
    return [], f"{type(e).__name__}: {e.strerror or e}"
  error, cut = None, False
  if listing is None:
    listing, error, cut = _tarfile_listing(path, size)
  samples: dict[str, Members] = {}
  for name, offset, length in listing:
    key, ext = _split_name(name)
    if ext in _MEMBER_EXTS:
      samples.setdefault(key, {}).setdefault(ext, (offset, length))
    else:
      samples.setdefault(key, {})
  if cut:
    # The sample whose member the file cuts short goes with the rest (its members listed before
    # are dropped too); one whose members are intact is kept, converted with what it has.
    samples.pop(_split_name(listing[-1][0])[0], None)
  return [(k, m) for k, m in samples.items() if m], error


def _read(f, members: Members, ext: str) -> bytes:
  offset, size = members[ext]
  f.seek(offset)
  data = f.read(size)
  if len(data) != size:
    raise EOFError(f"member .{ext} is truncated")
  return data


def _sample(f, record_id: int, key: str, members: Members, name: str,
            image_size: int | None) -> core.Outcome:
  source = f"{name}:{key}"
  where = {"source": source, "id": record_id}

  def skip(reason: str) -> core.Outcome:
    return core.Outcome(record_id, where, None, reason)

  image_ext = next((e for e in IMAGE_EXTS if e in members), None)
  if image_ext is None:
    return skip(f"missing image: {key} has only " + ", ".join(f".{e}" for e in members))
  meta: dict[str, Any] = {}
  try:
    if "json" in members:
      raw = _read(f, members, "json")
      try:
        meta = json.loads(raw.decode("utf-8-sig"))
      except UnicodeDecodeError:
        return skip(f"malformed json: {key}.json: not UTF-8")
      except json.JSONDecodeError as e:
        return skip(f"malformed json: {key}.json: {e.msg} at line {e.lineno} column {e.colno}")
      if not isinstance(meta, dict):
        return skip(f"malformed json: {key}.json: expected an object, got {type(meta).__name__}")
    listed = meta.get("captions", meta.get("caption"))
    if isinstance(listed, list):
      raw_captions = listed
    elif "txt" in members:
      try:
        raw_captions = _read(f, members, "txt").decode("utf-8-sig")
      except UnicodeDecodeError:
        return skip(f"undecodable caption: {key}.txt: not UTF-8")
    else:
      raw_captions = listed
    captions = core.clean_captions(raw_captions)
    if isinstance(captions, str):
      return skip(captions)
    langs = core.caption_langs(captions, core.given_lang(meta))
    data = _read(f, members, image_ext)
  except (OSError, EOFError) as e:
    return skip(f"unreadable tar: {name}: {key}: {e}")
  try:
    image = core.encode_image(data, image_size, f"{key}.{image_ext}")
  except ValueError as e:
    return skip(str(e))
  return core.Outcome(record_id, where, core.make_record(record_id, image, captions, langs, source),
                      None)


def _process(task: tuple) -> list[core.Outcome]:
  """One unit of work: a chunk of one tar's samples, or an unreadable tar's one skip."""
  if task[0] == "broken":
    _, order, where, reason = task
    return [core.Outcome(order, where, None, reason)]
  _, path, name, samples, image_size = task
  try:
    f = open(path, "rb")
  except OSError as e:
    return [core.Outcome(i, {"source": f"{name}:{k}", "id": i}, None,
                         f"unreadable tar: {name}: {e.strerror}") for i, k, _ in samples]
  with f:
    return [_sample(f, i, k, m, name, image_size) for i, k, m in samples]


def _tasks(files: list[str], names: list[str], image_size: int | None,
           chunk: int) -> Iterator[tuple]:
  # Listed here, one tar at a time as the workers need more (not in a second pool: forking one
  # while another pool's thread runs can deadlock), which keeps memory to a tar's listing.
  next_id = 1
  for path, name in zip(files, names):
    samples, error = scan_tar(path)
    for start in range(0, len(samples), chunk):
      part = samples[start:start + chunk]
      yield ("samples", path, name,
             [(next_id + start + j, key, m) for j, (key, m) in enumerate(part)], image_size)
    next_id += len(samples)
    if error is not None:
      yield ("broken", next_id, {"source": name}, f"unreadable tar: {name}: {error}")


def convert(files: list[str], output_dir: str | os.PathLike, *, split: str = "train",
            num_shards: int = 1, image_size: int | None = None, seed: int = 0,
            num_workers: int | None = None, force: bool = False,
            max_skip_fraction: float = 1.0) -> dict[str, Any]:
  """Writes `split` shards for the webdataset tars `files` (in this order); returns the summary
  of `jsonl_to_shards.convert` (skipped_examples name the sample: {"source": "<tar>:<key>",
  "id", "reason"}). Raises SkipFractionError, publishing nothing, when more than
  `max_skip_fraction` of the samples are skipped."""
  start = time.monotonic()
  output_dir = Path(output_dir)
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  if not files:
    raise ValueError("no input tars")
  params = to_shards.build_params("webdataset", files, num_shards=num_shards,
                                  image_size=image_size, seed=seed, layout=core.LAYOUT)
  done = core.reusable(output_dir, split, params, force, start)
  if done is not None:
    return done
  if num_workers is None:
    num_workers = parallel.default_num_workers()
  # Chunks small enough that every worker has several, large enough to amortise the hand-off.
  total = sum(os.path.getsize(f) for f in files)
  chunk = max(1, min(64, math.ceil(total / 60_000 / (4 * max(1, num_workers)))))
  tasks = _tasks(files, to_shards.display_names(files), image_size, chunk)
  outcomes = (o for results in parallel.imap(_process, tasks, num_workers) for o in results)
  return core.write_split(output_dir, split, num_shards, params, outcomes, core.Skips(),
                          max_skip_fraction=max_skip_fraction, start=start,
                          deal_seed=seed, noun="samples")
