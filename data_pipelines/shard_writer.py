"""Writing ArrayRecord shards and their manifest, atomically.

Layout of a dataset directory:
  {split}-{i:05d}-of-{n:05d}.array_record   one msgpack record each (bigvl.data.formats.records)
  manifest.json                              params, per-shard counts and digests

Shards use `group_size:1` so that grain can read any record without decoding its
neighbours. A digest is SHA-256 over the encoded records in order (length-prefixed),
i.e. over content, not over the container's bytes, so it says whether two builds
hold the same data regardless of how ArrayRecord laid them out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from bigvl.data.formats.records import decode_record

MANIFEST = "manifest.json"
WRITER_OPTIONS = "group_size:1"


def shard_filename(split: str, index: int, num_shards: int) -> str:
  return f"{split}-{index:05d}-of-{num_shards:05d}.array_record"


def shard_ranges(num_records: int, num_shards: int) -> list[tuple[int, int]]:
  """Contiguous [start, stop) index ranges whose sizes differ by at most one."""
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  bounds = [num_records * k // num_shards for k in range(num_shards + 1)]
  return list(zip(bounds[:-1], bounds[1:]))


@dataclasses.dataclass
class ShardInfo:
  file: str  # Name relative to the dataset directory.
  num_records: int
  num_bytes: int
  digest: str


class _Digest:
  """SHA-256 over a sequence of records; the length prefix keeps boundaries."""

  def __init__(self) -> None:
    self._h = hashlib.sha256()

  def update(self, record: bytes) -> None:
    self._h.update(len(record).to_bytes(8, "little"))
    self._h.update(record)

  def hexdigest(self) -> str:
    return self._h.hexdigest()


def combine_digests(digests: Iterable[str]) -> str:
  h = hashlib.sha256()
  for d in digests:
    h.update(bytes.fromhex(d))
  return h.hexdigest()


class ShardWriter:
  """One ArrayRecord file being written; close() returns its ShardInfo.

  Lets a caller keep several shards open and feed them as records arrive.
  """

  def __init__(self, path: str | os.PathLike) -> None:
    self.path = Path(path)
    self._writer = ArrayRecordWriter(str(self.path), WRITER_OPTIONS)
    self._digest = _Digest()
    self._count = 0

  def write(self, record: bytes) -> None:
    self._writer.write(record)
    self._digest.update(record)
    self._count += 1

  def close(self) -> ShardInfo:
    ok = self._writer.ok()
    self._writer.close()
    if not ok:
      raise OSError(f"ArrayRecord writer failed for {self.path}")
    return ShardInfo(self.path.name, self._count, self.path.stat().st_size,
                     self._digest.hexdigest())

  def abort(self) -> None:
    if self._writer.is_open():
      self._writer.close()


def file_sha256(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def write_shard(path: str | os.PathLike, records: Iterable[bytes]) -> ShardInfo:
  """Writes already-encoded records to one ArrayRecord file."""
  writer = ShardWriter(path)
  try:
    for record in records:
      writer.write(record)
  except BaseException:
    writer.abort()
    raise
  return writer.close()


def read_records(path: str | os.PathLike) -> Iterator[bytes]:
  reader = ArrayRecordReader(str(path))
  try:
    n = reader.num_records()
    for start in range(0, n, 1024):
      yield from reader.read(list(range(start, min(start + 1024, n))))
  finally:
    reader.close()


def read_shard(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
  """Decoded records of one shard, in order (for tools and tests; training uses grain)."""
  for record in read_records(path):
    yield decode_record(record)


def split_entry(shards: list[ShardInfo]) -> dict[str, Any]:
  """The manifest entry for one split."""
  return {
      "num_records": sum(s.num_records for s in shards),
      "digest": combine_digests(s.digest for s in shards),
      "shards": [dataclasses.asdict(s) for s in shards],
  }


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes JSON via a temp file and rename, so readers never see half a file."""
  path = Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(obj, f, ensure_ascii=False, indent=2, sort_keys=True)
      f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp creates 0600.
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
  try:
    with open(Path(directory) / MANIFEST, encoding="utf-8") as f:
      return json.load(f)
  except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
    return None


def split_files_intact(directory: str | os.PathLike, entry: dict[str, Any]) -> bool:
  """Whether every shard a manifest entry lists exists with its recorded size.

  Sizes, not digests: re-reading every record would cost as much as a rebuild,
  and a truncated or missing file is what an interrupted copy leaves behind.
  """
  directory = Path(directory)
  for shard in entry["shards"]:
    try:
      if (directory / shard["file"]).stat().st_size != shard["num_bytes"]:
        return False
    except FileNotFoundError:
      return False
  return True


def _remove_stale(target: Path, max_age_s: float = 3600.0) -> None:
  """Deletes staging/old dirs of `target` left by killed builds.

  Age, not pid liveness: the builder may have run on another host sharing this
  filesystem. No build takes anywhere near an hour.
  """
  now = time.time()
  for pattern in (f".{target.name}.staging-*", f".{target.name}.old-*"):
    for path in target.parent.glob(pattern):
      with contextlib.suppress(OSError):
        if now - path.stat().st_mtime > max_age_s:
          shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staging_dir(target: str | os.PathLike) -> Iterator[Path]:
  """A fresh temp directory beside `target` (same filesystem, so rename works).

  Removed on exit unless the body moved it away.
  """
  target = Path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  _remove_stale(target)
  tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.staging-"))
  tmp.chmod(0o755)  # mkdtemp's 0700 would survive the rename and lock out other users.
  try:
    yield tmp
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike) -> Iterator[None]:
  """An exclusive advisory lock on `directory`/.lock (serialises manifest updates)."""
  import fcntl  # POSIX only; imported here so the module loads anywhere.

  with open(Path(directory) / ".lock", "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def publish_split(staged: Path, directory: str | os.PathLike, split: str,
                  entry: dict[str, Any], fmt: str) -> None:
  """Moves one split's staged shards into a directory shared with other splits.

  Several files cannot be renamed atomically, so the manifest is the commit
  point: the split's entry is dropped first, the files are swapped, and the new
  entry is written last. A reader that trusts only the manifest never sees a
  mix of old and new shards.
  """
  directory = Path(directory)
  with directory_lock(directory):
    manifest = read_manifest(directory) or {"format": fmt, "splits": {}}
    if manifest.get("format") != fmt:
      raise FileExistsError(f"{directory} holds a {manifest.get('format')!r} dataset, not {fmt!r}")
    manifest["splits"].pop(split, None)
    write_json(directory / MANIFEST, manifest)
    new_files = {s["file"] for s in entry["shards"]}
    for old in directory.glob(f"{split}-*-of-*.array_record"):
      if old.name not in new_files:
        old.unlink()
    for name in new_files:
      os.replace(staged / name, directory / name)
    manifest["splits"][split] = entry
    write_json(directory / MANIFEST, manifest)


def publish_dir(staged: Path, target: str | os.PathLike) -> None:
  """Moves a fully written directory into place, replacing `target` if it exists.

  The old directory is first renamed aside, so `target` is only ever absent for
  an instant and never half-written. Raises OSError if another process publishes
  `target` between the two renames; callers re-check and reuse theirs.
  """
  target = Path(target)
  old = None
  if target.exists():
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    os.rename(target, old / "d")
  os.rename(staged, target)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def publish_or_reuse(staged: Path, target: str | os.PathLike,
                     is_complete: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
  """`publish_dir`, except that when another process published `target` first, theirs is kept if
  `is_complete()` finds it whole (the build's manifest is returned either way)."""
  try:
    publish_dir(staged, target)
  except OSError:
    theirs = is_complete()
    if theirs is None:
      raise
    return theirs
  return read_manifest(target)


MANIFEST_FORMAT_EXISTING = "bigvl.shards/existing"


def shard_info(path: str | os.PathLike, name: str | None = None) -> ShardInfo:
  """Counts and digests an existing shard (reads every record once)."""
  digest, n = _Digest(), 0
  for record in read_records(path):
    digest.update(record)
    n += 1
  return ShardInfo(file=name or Path(path).name, num_records=n,
                   num_bytes=os.path.getsize(path), digest=digest.hexdigest())


def write_manifest(directory: str | os.PathLike, num_workers: int = 1) -> dict[str, Any]:
  """Writes `manifest.json` for the ArrayRecord shards already in `directory` (made by another tool,
  or before bigvl wrote manifests), so training indexes them without opening each one. Shards named
  `{split}-NNNNN-of-NNNNN.array_record` go to their split, others to "train". Returns the manifest."""
  from data_pipelines import parallel
  directory = Path(directory)
  files = sorted(directory.glob("*.array_record"))
  if not files:
    raise FileNotFoundError(f"no *.array_record files in {directory}")
  infos = list(parallel.imap(shard_info, [str(f) for f in files], num_workers))
  splits: dict[str, list[ShardInfo]] = {}
  for f, info in zip(files, infos):
    m = re.fullmatch(r"(.+)-\d+-of-\d+\.array_record", f.name)
    split = m.group(1) if m else "train"
    splits.setdefault(split, []).append(info)
  with directory_lock(directory):
    manifest = read_manifest(directory) or {"format": MANIFEST_FORMAT_EXISTING, "splits": {}}
    manifest.setdefault("splits", {}).update(
        {split: split_entry(infos) for split, infos in splits.items()})
    write_json(directory / MANIFEST, manifest)
  return manifest
