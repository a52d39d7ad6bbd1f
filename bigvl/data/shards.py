"""ArrayRecord training shards addressed through their manifest, with a bounded number of open files.

Opening an ArrayRecord reader loads that shard's index (20–28 bytes per record), so a source that
opens every shard (as `grain.sources.ArrayRecordDataSource` does for a global shuffle) costs memory in
proportion to the records: over 100 GB per process at BM-6B's 6·10⁹. Here the global index is built
from the record counts that `launch/build_shards.py` writes in `manifest.json` beside the shards
(`bigvl.data.sources.ShardIndex`: a few bytes per shard, O(log shards) per look-up), and at most
`max_open` readers are open at any time, the least recently used closed first. Start-up opens no
shard; memory and start-up grow with the number of shards only by the manifest's few bytes each.

Shards without a manifest still work: each is opened once to count its records (and closed), with a
warning that says how to write one. A shard whose size differs from its manifest's (a copy cut short)
is left out and reported like a shard that cannot be opened.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
from typing import Any, Sequence

from array_record.python import array_record_module

from bigvl.data.sources import ShardIndex

_LOG = logging.getLogger(__name__)

MANIFEST = "manifest.json"   # data_pipelines.shard_writer.MANIFEST
DEFAULT_MAX_OPEN = 64


def _open(path: str) -> Any:
  return array_record_module.ArrayRecordReader(path, options="readahead_buffer_size:0",
                                               file_reader_buffer_size=32768)


def _manifest_counts(directory: str) -> dict[str, tuple[int, int]]:
  """{file name: (records, bytes)} of every shard a directory's manifest lists ({} without one)."""
  try:
    with open(os.path.join(directory, MANIFEST), encoding="utf-8") as f:
      manifest = json.load(f)
  except (FileNotFoundError, NotADirectoryError):
    return {}
  except (OSError, ValueError) as e:
    _LOG.warning("%s cannot be read (%s: %s): counting its shards instead",
                 os.path.join(directory, MANIFEST), type(e).__name__, e)
    return {}
  out = {}
  for split in (manifest.get("splits") or {}).values():
    for shard in split.get("shards", []):
      out[os.path.basename(shard["file"])] = (int(shard["num_records"]), int(shard["num_bytes"]))
  return out


def count_records(files: Sequence[str]) -> tuple[list[str], list[int], list[str]]:
  """(readable files, their record counts, files left out) for `files`, in order.

  Counts come from each directory's manifest (one `stat` per shard, to catch a copy cut short);
  a shard the manifest does not list is opened once to count it.
  """
  manifests: dict[str, dict[str, tuple[int, int]]] = {}
  good, counts, bad, unlisted = [], [], [], 0
  for f in files:
    d = os.path.dirname(os.path.abspath(f))
    if d not in manifests:
      manifests[d] = _manifest_counts(d)
    listed = manifests[d].get(os.path.basename(f))
    if listed is not None:
      try:
        size = os.path.getsize(f)
      except OSError as e:
        _LOG.warning("skipping shard %s: %s", f, e)
        bad.append(f)
        continue
      if size != listed[1]:
        _LOG.warning("skipping shard %s: %d bytes, its manifest says %d (a copy cut short?)", f,
                     size, listed[1])
        bad.append(f)
        continue
      good.append(f)
      counts.append(listed[0])
      continue
    unlisted += 1
    try:
      reader = _open(f)
      try:
        n = int(reader.num_records())
      finally:
        reader.close()
      good.append(f)
      counts.append(n)
    except Exception as e:  # A truncated file fails its footer check (at open or at close).
      _LOG.warning("skipping shard %s: cannot be read: %s: %s", f, type(e).__name__, e)
      bad.append(f)
  if unlisted:
    _LOG.warning("%d of %d shards are in no %s: each was opened to count its records (start-up "
                 "then grows with the data); write one with `python launch/build_shards.py "
                 "--write_manifest=DIR`", unlisted, len(files), MANIFEST)
  return good, counts, bad


class ShardSource:
  """Records by global index over `files` (record counts `counts`), at most `max_open` readers open.

  Random access like `grain.sources.ArrayRecordDataSource`, safe to use from many threads and
  picklable into worker processes (each opens its own readers). A reader in use by one thread is
  never closed under it; the least recently used idle one is closed when a new one is needed, and
  when all `max_open` are in use the thread waits for one, so the bound holds at every instant.
  """

  def __init__(self, files: Sequence[str], counts: Sequence[int], max_open: int = DEFAULT_MAX_OPEN):
    if len(files) != len(counts):
      raise ValueError(f"{len(files)} files but {len(counts)} record counts")
    if max_open < 1:
      raise ValueError(f"max_open must be >= 1, got {max_open}")
    self.files = list(files)
    self.index = ShardIndex(counts)
    self.max_open = max_open
    self._init_readers()

  def _init_readers(self) -> None:
    self._lock = threading.Condition()
    self._readers: collections.OrderedDict[int, list] = collections.OrderedDict()  # shard: [r, uses]
    self.opened = 0   # readers opened so far (for tests and stats)

  def __getstate__(self) -> dict[str, Any]:
    return {"files": self.files, "index": self.index, "max_open": self.max_open}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._init_readers()

  def __len__(self) -> int:
    return len(self.index)

  def locate(self, index: int) -> tuple[int, int]:
    return self.index.locate(index)

  def _acquire(self, shard: int) -> list:
    with self._lock:
      entry = self._readers.get(shard)
      if entry is not None:
        self._readers.move_to_end(shard)
        entry[1] += 1
        return entry
      while len(self._readers) >= self.max_open:
        idle = next((s for s, e in self._readers.items() if e[1] == 0), None)
        if idle is None:   # every open reader is being read: wait for a release
          self._lock.wait()
          entry = self._readers.get(shard)
          if entry is not None:   # another thread opened it meanwhile
            self._readers.move_to_end(shard)
            entry[1] += 1
            return entry
          continue
        self._readers.pop(idle)[0].close()
      entry = [_open(self.files[shard]), 1]
      self._readers[shard] = entry
      self.opened += 1
      return entry

  def _release(self, entry: list) -> None:
    with self._lock:
      entry[1] -= 1
      if entry[1] == 0:
        self._lock.notify()

  def __getitem__(self, index: int) -> bytes:
    shard, position = self.index.locate(index)
    entry = self._acquire(shard)
    try:
      return entry[0].read([position])[0]
    finally:
      self._release(entry)

  def open_readers(self) -> int:
    with self._lock:
      return len(self._readers)

  def close(self) -> None:
    with self._lock:
      for reader, _ in self._readers.values():
        reader.close()
      self._readers.clear()

  def __repr__(self) -> str:
    return (f"ShardSource({len(self):,} records in {self.index.num_shards:,} shards, at most "
            f"{self.max_open} open)")
