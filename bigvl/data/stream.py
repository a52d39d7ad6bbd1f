"""The grain stream every record format trains on: shards, global shuffle, resume, skip accounting.

A format (`bigvl.data.formats`) hands the stream three things: `parse`, one record's raw bytes ->
an example dict (or `raise RecordFailure(reason, error)`), `collate`, examples -> a batch of numpy
arrays with an int64 "id", and `reasons`, the reasons its records can be skipped for (always
including `BAD_RECORD`). The stream knows nothing else about the records.

Training stream (`train_stream`):
  readable shards -> source -> parse (by global record index) -> index shuffle -> repeat -> this
  reader's rows of each global batch -> drop bad records -> batch -> [worker processes] ->
  accounting (ids digest, skip counts, skip threshold)
Everything before batching is index-based (`MapDataset`), so shuffling needs constant memory and
the iterator state is a handful of integers; restoring it resumes at the exact next batch. Parsing
sits at the source level only so it knows the global record index (for error reports); it runs
lazily, when the shuffled stream asks for that record.

All readers walk one global shuffled stream: global batch k is its records [k*B, (k+1)*B)
(B = batch_size * blocks) and block p reads rows [p*b, (p+1)*b) of it. So the global batches do not
depend on the number of blocks (a 2-process run trains on the data of a 1-process run), every
block yields the same number of batches, which collective training steps need, and `resume_state`
can move a position to another block count. Epoch e is shuffled with seed (s + e) where s is
derived from `seed`, so epochs differ and are reproducible. The stream depends on `worker_count`
(grain slices the stream per worker), but is deterministic for a fixed count.

Bad records (unreadable bytes: `BAD_RECORD`; whatever `parse` rejects, with its reason) are dropped
and logged with their file and index; shard files that cannot be opened (e.g. truncated) are left
out and logged. The training iterator counts both in its checkpointed state (`stats()`: exact
across worker processes and resumes) and keeps a running digest of the example ids it served
(`ids_sha256`); once more than `max_skip_fraction` of the records (or of the shard files) are bad
it raises `DataQualityError` naming the worst shard. `skipped_counts()` is the same count kept per
process.

`eval_stream` is the evaluation side: every record once, in file order, padded to whole batches.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import inspect
import logging
import math
import threading
from typing import Any, Callable, Iterator, Sequence

from absl import flags
import grain
import numpy as np

from bigvl.data import shards

_LOG = logging.getLogger(__name__)

# Records whose bytes cannot be read or parsed at all; every format's `reasons` include it.
BAD_RECORD = "bad_record"

# One record's raw bytes -> example dict; raises `RecordFailure` for a record to skip.
Parse = Callable[[bytes], dict[str, Any]]
# Examples -> a batch of numpy arrays, with "id": int64 (b,).
Collate = Callable[[Sequence[dict[str, Any]]], dict[str, np.ndarray]]

# The skip fraction is judged only after this many records (or a whole pass
# over the reader's records, if fewer): a few bad records among the first
# dozens would otherwise stop a run whose data is fine overall.
MIN_RECORDS_FOR_SKIP_FRACTION = 1000


class DataQualityError(RuntimeError):
  """More of the data is bad than the run allows; the message names the worst shard."""


class RecordFailure(Exception):
  """Raised by a format's `parse` for a record the stream should skip, with the reason counted."""

  def __init__(self, reason: str, error: Exception):
    super().__init__(f"{reason}: {type(error).__name__}: {error}")
    self.reason = reason


_skipped: collections.Counter[str] = collections.Counter()
_skipped_lock = threading.Lock()

# Parsing threads of the training stream, in this process and in each worker
# process, and how many parsed examples they keep ready. Every example served
# costs Python work proportional to the ready ones, so grain's default buffer
# (500) spends a third of a worker's CPU on bookkeeping; 64 keeps the threads
# busy (launch/bench_data.py: about 1.6x the images per CPU-second).
READ_OPTIONS = grain.ReadOptions(num_threads=16, prefetch_buffer_size=64)

# A stream where every record fails would otherwise spin forever looking for a
# good one; this many failures in a row is a broken dataset or a bug.
MAX_CONSECUTIVE_FAILURES = 1000


def skipped_counts() -> dict[str, int]:
  """Records skipped so far in this process, by reason."""
  with _skipped_lock:
    return dict(_skipped)


def reset_skipped_counts() -> None:
  with _skipped_lock:
    _skipped.clear()


def _check_block(block: int, blocks: int) -> None:
  if not 0 <= block < blocks:
    raise ValueError(f"block {block} not in [0, {blocks})")


class _Locator:
  """Maps a global record index to (file index, index within the file).

  From the shards' index when the source has one (`shards.ShardSource`); else per-file lengths
  are read only on the first error, so the common path opens no extra readers. Without files (a
  source that is not shard paths) the whole source counts as file 0.
  """

  def __init__(self, files: Sequence[str], index: Any = None):
    self.files = list(files)
    self.index = index
    self._ends: list[int] | None = None

  def __call__(self, index: int) -> tuple[int, int]:
    if not self.files:
      return 0, index
    if self.index is not None:
      return self.index.locate(index)
    if self._ends is None:
      ends, total = [], 0
      for f in self.files:
        total += len(grain.sources.ArrayRecordDataSource([f]))
        ends.append(total)
      self._ends = ends
    file_index = bisect.bisect_right(self._ends, index)
    start = self._ends[file_index - 1] if file_index else 0
    return file_index, index - start

  def describe(self, index: int) -> str:
    if not self.files:
      return f"record {index}"
    file_index, in_file = self(index)
    return (f"file {file_index} ({self.files[file_index]}) record {in_file} "
            f"(global index {index})")


class _Unreadable:
  """Stands in for the bytes of a record that could not be read from its shard."""

  def __init__(self, error: Exception):
    self.error = error


class _TolerantSource:
  """ArrayRecord records by global index (at most `max_open` shards open); a read error gives an
  `_Unreadable`."""

  def __init__(self, files: Sequence[str], counts: Sequence[int], max_open: int):
    self._source = shards.ShardSource(files, counts, max_open)
    self.index = self._source.index

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> bytes | _Unreadable:
    try:
      return self._source[index]
    except Exception as e:  # A corrupt chunk raises RuntimeError; keep any reason.
      return _Unreadable(e)


class _Skipper:
  """Parses records, counting and logging failures; stops a stream that only fails."""

  def __init__(self, parse: Parse, files: Sequence[str], index: Any = None):
    self.parse = parse
    self.locate = _Locator(files, index)
    self._in_a_row = 0
    try:
      self.takes_draw = "draw" in inspect.signature(parse).parameters
    except (TypeError, ValueError):
      self.takes_draw = False

  def __call__(self, index: int, raw: bytes | _Unreadable,
               draw: int | None = None) -> dict[str, Any] | RecordFailure:
    """The example of record `index`, or the failure (already counted and logged). `draw` (a
    random integer fixed by the stream position) goes to a parse that takes one."""
    try:
      if isinstance(raw, _Unreadable):
        raise RecordFailure(BAD_RECORD, raw.error)
      example = (self.parse(raw, draw=draw) if self.takes_draw and draw is not None
                 else self.parse(raw))
    except RecordFailure as failure:
      self._fail(index, failure)
      return failure
    self._in_a_row = 0
    return example

  def _fail(self, index: int, failure: RecordFailure) -> None:
    with _skipped_lock:
      _skipped[failure.reason] += 1
    _LOG.warning("skipping %s: %s", self.locate.describe(index), failure)
    self._in_a_row += 1
    if self._in_a_row >= MAX_CONSECUTIVE_FAILURES:
      raise RuntimeError(
          f"{self._in_a_row} records in a row failed to decode; last: "
          f"{self.locate.describe(index)}: {failure}")


class _Skip:
  """What the stream carries in place of a bad record, up to `_AttachSkips`."""

  def __init__(self, file_index: int, reason: int):
    self.file_index, self.reason = file_index, reason


class _WithIndex:
  """map_with_index fn at the source: (record index, bytes) -> (record index, bytes), so the
  record's place travels through the shuffle to the parse."""

  def __call__(self, index: int, raw: bytes) -> tuple[int, bytes]:
    return index, raw


class _TrainExample:
  """map_with_index fn after shuffle and repeat: (stream position, (record index, bytes)) ->
  example | _Skip. A parse that takes `draw` gets an integer fixed by (seed, position): a record
  met again in a later epoch draws anew (one of its captions), and a resumed stream draws the
  same."""

  def __init__(self, parse: Parse, reasons: Sequence[str], files: Sequence[str],
               num_records: int, index: Any = None, seed: int = 0):
    self.reasons = tuple(reasons)
    self.num_records = num_records
    self.skipper = _Skipper(parse, files, index)
    self.seed = seed

  def __call__(self, position: int, item: tuple[int, bytes]) -> dict[str, Any] | _Skip:
    index, raw = item
    index %= self.num_records
    draw = (int(np.random.SeedSequence([self.seed, position]).generate_state(1)[0])
            if self.skipper.takes_draw else None)
    example = self.skipper(index, raw, draw)
    if isinstance(example, RecordFailure):
      if example.reason not in self.reasons:
        raise ValueError(f"parse failed for reason {example.reason!r}, not one of the "
                         f"format's reasons {self.reasons}")
      return _Skip(self.skipper.locate(index)[0], self.reasons.index(example.reason))
    return example


class _AttachSkips(grain.IterDataset):
  """Drops `_Skip`s, handing each on as (file index, reason) in the next good example's "skipped".

  The state is the parent's: after a good example no skip is pending, so the
  skips travel with the batch (through worker processes) into the accounting.
  """

  def __iter__(self) -> grain.DatasetIterator:
    return _AttachSkipsIterator(self._parent.__iter__())


class _AttachSkipsIterator(grain.DatasetIterator):

  def __next__(self) -> dict[str, Any]:
    skipped = []
    while True:
      x = next(self._parent)
      if isinstance(x, _Skip):
        skipped.append((x.file_index, x.reason))
      else:
        return {**x, "skipped": skipped}

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


class _Collate:
  """The format's collate, plus the stream's own keys: "valid" (eval) and "skipped" (training)."""

  def __init__(self, collate: Collate):
    self.collate = collate

  def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    own = [k for k in ("valid", "skipped") if k in examples[0]]
    batch = self.collate([{k: v for k, v in e.items() if k not in own} for e in examples]
                         if own else examples)
    if "valid" in own:
      batch["valid"] = np.asarray([e["valid"] for e in examples], dtype=bool)
    if "skipped" in own:
      batch["skipped"] = np.asarray(
          [s for e in examples for s in e["skipped"]], np.int64).reshape(-1, 2)
    return batch


class _Accounting(grain.IterDataset):
  """The last stage: counts what was served and skipped, and enforces the skip limit."""

  def __init__(self, parent: grain.IterDataset, files: Sequence[str],
               unreadable: Sequence[str], records_per_pass: int,
               max_skip_fraction: float, reasons: Sequence[str]):
    super().__init__(parent)
    self._args = (list(files), list(unreadable), records_per_pass,
                  max_skip_fraction, tuple(reasons))

  def __iter__(self) -> "TrainIterator":
    return TrainIterator(self._parent.__iter__(), *self._args)


class TrainIterator(grain.DatasetIterator):
  """The training iterator: batches without "skipped", plus `stats()` and `ids_sha256`.

  Its state holds the counts and the digest next to the pipeline's position,
  so a resumed run reports what an uninterrupted one would.
  """

  def __init__(self, parent: grain.DatasetIterator, files: list[str],
               unreadable: list[str], records_per_pass: int,
               max_skip_fraction: float, reasons: tuple[str, ...]):
    super().__init__(parent)
    self.files, self.unreadable, self.reasons = files, unreadable, reasons
    self._min_records = min(MIN_RECORDS_FOR_SKIP_FRACTION, records_per_pass)
    self.max_skip_fraction = max_skip_fraction
    self._reset()

  def _reset(self) -> None:
    self.served = 0
    self.ids_sha256 = ""  # Chained: sha256(previous digest + this batch's ids).
    self.skipped = collections.Counter()          # reason -> records
    self.skipped_by_file = collections.Counter()  # file index -> records

  def __next__(self) -> dict[str, np.ndarray]:
    batch = dict(next(self._parent))
    for file_index, reason in batch.pop("skipped").tolist():
      self.skipped[self.reasons[reason]] += 1
      self.skipped_by_file[file_index] += 1
    ids = np.ascontiguousarray(batch["id"], dtype="<i8")
    self.ids_sha256 = hashlib.sha256(
        bytes.fromhex(self.ids_sha256) + ids.tobytes()).hexdigest()
    self.served += len(ids)
    self._check()
    return batch

  def _check(self) -> None:
    bad = sum(self.skipped.values())
    seen = bad + self.served
    if seen < self._min_records or bad <= self.max_skip_fraction * seen:
      return
    worst, count = self.skipped_by_file.most_common(1)[0]
    name = self.files[worst] if self.files else "the source"
    raise DataQualityError(
        f"{bad} of {seen} records skipped ({bad / seen:.1%}), more than "
        f"data.max_skip_fraction={self.max_skip_fraction}: worst shard "
        f"{name} ({count} skipped); {dict(self.skipped)}. Fix or "
        "remove the shard (the log names each bad record), or raise "
        "data.max_skip_fraction")

  def stats(self) -> dict[str, int]:
    """Records served and skipped (by reason), and shard files left out."""
    out = {"data/served": self.served, "data/skipped": sum(self.skipped.values()),
           "data/skipped_shards": len(self.unreadable)}
    out.update({f"data/skipped/{r}": self.skipped[r] for r in self.reasons})
    return out

  def get_state(self) -> dict[str, Any]:
    return {"pipeline": self._parent.get_state(), "served": self.served,
            "ids_sha256": self.ids_sha256, "skipped": dict(self.skipped),
            "skipped_by_file": {str(k): v for k, v in self.skipped_by_file.items()}}

  def set_state(self, state: dict[str, Any]) -> None:
    self._reset()
    if "pipeline" not in state:  # Saved before the accounting existed.
      _LOG.warning("data state without counts: counting skips and ids from here")
      self._parent.set_state(state)
      return
    self._parent.set_state(state["pipeline"])
    self.served, self.ids_sha256 = state["served"], state["ids_sha256"]
    self.skipped.update(state["skipped"])
    self.skipped_by_file.update({int(k): v for k, v in state["skipped_by_file"].items()})


def _shuffle_seed(seed: int) -> int:
  # Grain shuffles epoch e with (seed + e); hashing keeps runs with adjacent
  # seeds from sharing epochs.
  return int(np.random.SeedSequence(seed).generate_state(1)[0])


def _ensure_absl_flags_parsed() -> None:
  # grain's worker processes read absl flags (e.g. the worker-profiling flag)
  # and fail when the program never parsed any (pytest, notebooks, scripts
  # without absl.app); their defaults are what we want.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class _BlockRows(grain.MapDataset):
  """Rows [p*b, (p+1)*b) of every global batch of B = b * blocks records (p: the block)."""

  def __init__(self, parent: grain.MapDataset, batch_size: int, block: int, blocks: int):
    super().__init__(parent)
    self._b = batch_size
    self._global = batch_size * blocks
    self._offset = batch_size * block
    self._length = len(parent) // self._global * batch_size

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    k, row = divmod(index, self._b)
    return self._parent[k * self._global + self._offset + row]

  def __str__(self) -> str:
    return f"BlockRows(b={self._b}, B={self._global}, offset={self._offset})"


def train_stream(source: Sequence[str] | Any, *, parse: Parse, collate: Collate,
                 reasons: Sequence[str], batch_size: int, seed: int, block: int = 0,
                 blocks: int = 1, worker_count: int = 0, shuffle: bool = True,
                 num_epochs: int | None = None, max_skip_fraction: float = 1.0,
                 max_open_shards: int = shards.DEFAULT_MAX_OPEN) -> grain.IterDataset:
  """The training stream of this reader's batches.

  Args:
    source: ArrayRecord shard paths (a list or tuple); their order defines the
      global record index, their record counts come from the manifest beside
      them (`bigvl.data.shards`). Or any random-access source of record bytes
      (`len`, `[i]`), such as `bigvl.data.sources.VirtualSource`.
    parse: one record's bytes -> example dict; raises `RecordFailure` (with one
      of `reasons`) for a record to skip. Pickled into worker processes.
    collate: examples -> batch of numpy arrays with "id": int64 (b,).
    reasons: every reason `parse` can give, `BAD_RECORD` among them; their
      order is the order of `stats()`.
    batch_size: per-reader batch size; partial batches are dropped.
    seed: shuffle seed; the same seed gives the same stream.
    block: which rows of each global batch this reader takes, in [0, blocks).
    blocks: readers sharing the global batch (global batch = batch_size * blocks).
    worker_count: grain worker processes; 0 parses in threads of this one.
    shuffle: shuffle records (anew each epoch).
    num_epochs: passes over all records; None repeats forever.
    max_skip_fraction: the share of bad records (and of unreadable shard
      files) above which the stream raises `DataQualityError`.
    max_open_shards: shard readers open at once in each process (the least
      recently used is closed first).

  Returns:
    A grain IterDataset; `iter()` gives a checkpointable `TrainIterator` of
    the batches `collate` makes.
  """
  _check_block(block, blocks)
  if BAD_RECORD not in reasons:
    raise ValueError(f"reasons {tuple(reasons)} lack {BAD_RECORD!r}")
  files, unreadable, index = [], [], None
  if isinstance(source, (list, tuple)):
    files, counts, unreadable = shards.count_records(source)
    if unreadable and (not files or
                       len(unreadable) > max_skip_fraction * (len(files) + len(unreadable))):
      raise DataQualityError(
          f"{len(unreadable)} of {len(files) + len(unreadable)} shard files cannot be read, "
          f"more than data.max_skip_fraction={max_skip_fraction}: first {unreadable[0]} "
          "(rewrite it with launch/build_shards.py, or leave it out of the glob)")
    source = _TolerantSource(files, counts, max_open_shards)
    index = source.index
  n = len(source)
  per_block = n // blocks
  if per_block == 0:
    raise ValueError(f"{n} records cannot feed {blocks} blocks")
  ds = grain.MapDataset.source(source).map_with_index(_WithIndex())
  if shuffle:
    ds = ds.shuffle(seed=_shuffle_seed(seed))
  ds = ds.repeat(num_epochs).map_with_index(_TrainExample(parse, reasons, files, n, index, seed))
  ds = _BlockRows(ds, batch_size, block, blocks)
  it = _AttachSkips(ds.to_iter_dataset(READ_OPTIONS)).batch(
      batch_size, drop_remainder=True, batch_fn=_Collate(collate))
  if worker_count > 0:
    _ensure_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return _Accounting(it, files, unreadable, per_block, max_skip_fraction, reasons)


def resume_state(fresh_state: dict[str, Any], global_batches: int,
                 batch_size: int) -> dict[str, Any]:
  """The state of a `train_stream` iterator that has yielded `global_batches` batches.

  `fresh_state` is `get_state()` of a new iterator of this reader's stream
  (any worker count). This is how a run resumes with another number of
  blocks: a checkpoint holds one position per process, but all blocks walk
  the same global stream, so global batch k is a position in any block
  count. Records skipped as bad before k are not accounted for: the counts and
  the ids digest start again here.
  """
  state = dict(fresh_state)
  if "pipeline" in state:  # TrainIterator: the position and its counts.
    state["pipeline"] = resume_state(state["pipeline"], global_batches,
                                     batch_size)
    return state
  if "iterators_in_use_states" in state:
    # Worker processes: worker w reads records w, w + W, ... of this reader's
    # stream and the output takes batch j from worker j % W.
    workers = len(state["iterators_in_use_states"])
    state["next_index_in_cycle"] = global_batches % workers
    state["iterators_in_use_states"] = [
        resume_state(s, -(-(global_batches - w) // workers), batch_size)
        for w, s in enumerate(state["iterators_in_use_states"])]
    return state
  if set(state) != {"next_index"}:
    raise ValueError(f"unknown data iterator state {fresh_state}")
  return {"next_index": global_batches * batch_size}


class _EvalExample:
  """k-th example of this block, or the padding example marked invalid."""

  def __init__(self, source: grain.sources.ArrayRecordDataSource, parse: Parse,
               padding: dict[str, Any], files: Sequence[str], block: int, blocks: int):
    self.source = source
    self.block, self.blocks = block, blocks
    self.skipper = _Skipper(parse, files)
    self.padding = {**padding, "valid": False}

  def __call__(self, k: int) -> dict[str, Any]:
    index = self.block + k * self.blocks
    if index >= len(self.source):
      return dict(self.padding)
    example = self.skipper(index, self.source[index])
    if isinstance(example, RecordFailure):
      return dict(self.padding)
    example["valid"] = True
    return example


def eval_stream(files: Sequence[str], *, parse: Parse, collate: Collate,
                padding: dict[str, Any], batch_size: int, block: int = 0,
                blocks: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Every record once, in file order, as batches with a "valid" mask.

  Block p reads records p, p + P, p + 2P, ... (P = blocks); all blocks yield the same
  number of batches, padded with `padding` examples whose "valid" is False.
  Records that `parse` rejects also come out as invalid padding, so positions stay fixed.
  """
  _check_block(block, blocks)
  source = grain.sources.ArrayRecordDataSource(list(files))
  per_block = math.ceil(len(source) / blocks)
  total = math.ceil(per_block / batch_size) * batch_size
  ds = grain.MapDataset.range(total).map(
      _EvalExample(source, parse, padding, files, block, blocks))
  return iter(ds.to_iter_dataset().batch(batch_size, batch_fn=_Collate(collate)))
