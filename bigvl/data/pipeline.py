"""Grain input pipelines over ArrayRecord image-caption shards.

Training stream (`train_dataset`):
  readable shards -> source -> decode (by global record index) -> index
  shuffle -> repeat -> this process's rows of each global batch -> drop bad
  records -> batch -> [worker processes] -> accounting (ids digest, skip
  counts, skip threshold)
Everything before batching is index-based (`MapDataset`), so shuffling needs
constant memory and the iterator state is a handful of integers; restoring it
resumes at the exact next batch. Decoding sits at the source level only so it
knows the global record index (for error reports); it runs lazily, when the
shuffled stream asks for that record.

All processes walk one global shuffled stream: global batch k is its records
[k*B, (k+1)*B) (B = batch_size * process_count) and process p reads rows
[p*b, (p+1)*b) of it. So the global batches do not depend on the process
count (a 2-process run trains on the data of a 1-process run), every process
yields the same number of batches, which collective training steps need, and
`resume_state` can move a position to another process count. Epoch e is
shuffled with seed (s + e) where s is derived from `seed`, so epochs differ and
are reproducible. The stream depends on `worker_count` (grain slices the
stream per worker), but is deterministic for a fixed count.

Bad records (unreadable or invalid msgpack, undecodable image, missing or
empty caption) are dropped and logged with their file and index; shard files
that cannot be opened (e.g. truncated) are left out and logged. The training
iterator counts both in its checkpointed state (`stats()`: exact across
worker processes and resumes) and keeps a running digest of the example ids
it served (`ids_sha256`); once more than `max_skip_fraction` of the records
(or of the shard files) are bad it raises `DataQualityError` naming the worst
shard. `skipped_counts()` is the same count kept per process.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import logging
import math
import threading
from typing import Any, Iterator, Sequence

from absl import flags
import grain
import numpy as np

from bigvl.data import image_ops
from bigvl.data import records
from bigvl.tokenizers import glm

_LOG = logging.getLogger(__name__)

# Reasons a record is skipped, as counted in `skipped_counts()`.
BAD_RECORD, BAD_IMAGE, BAD_CAPTION = "bad_record", "bad_image", "bad_caption"
REASONS = (BAD_RECORD, BAD_IMAGE, BAD_CAPTION)

# The skip fraction is judged only after this many records (or a whole pass
# over the process's records, if fewer): a few bad records among the first
# dozens would otherwise stop a run whose data is fine overall.
MIN_RECORDS_FOR_SKIP_FRACTION = 1000


class DataQualityError(RuntimeError):
  """More of the data is bad than the run allows; the message names the worst shard."""

_skipped: collections.Counter[str] = collections.Counter()
_skipped_lock = threading.Lock()

# Decoding threads of the training stream, in this process and in each worker
# process, and how many decoded examples they keep ready. Every example served
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


class _Locator:
  """Maps a global record index to (file index, index within the file).

  Per-file lengths are read only on the first error, so the common path opens
  no extra readers.
  """

  def __init__(self, files: Sequence[str]):
    self.files = list(files)
    self._ends: list[int] | None = None

  def __call__(self, index: int) -> tuple[int, int]:
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
    file_index, in_file = self(index)
    return (f"file {file_index} ({self.files[file_index]}) record {in_file} "
            f"(global index {index})")


class _Unreadable:
  """Stands in for the bytes of a record that could not be read from its shard."""

  def __init__(self, error: Exception):
    self.error = error


class _TolerantSource:
  """ArrayRecord records by global index; a read error gives an `_Unreadable`."""

  def __init__(self, files: Sequence[str]):
    self._source = grain.sources.ArrayRecordDataSource(list(files))

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> bytes | _Unreadable:
    try:
      return self._source[index]
    except Exception as e:  # A corrupt chunk raises RuntimeError; keep any reason.
      return _Unreadable(e)


def _readable_files(files: Sequence[str]) -> tuple[list[str], list[str]]:
  """(files that open, files that do not); the latter are logged."""
  good, bad = [], []
  for f in files:
    try:
      len(grain.sources.ArrayRecordDataSource([f]))
      good.append(f)
    except Exception as e:  # A truncated file fails its footer check.
      _LOG.warning("skipping shard %s: cannot be read: %s: %s", f,
                   type(e).__name__, e)
      bad.append(f)
  return good, bad


class _Failure(Exception):
  def __init__(self, reason: str, error: Exception):
    super().__init__(f"{reason}: {type(error).__name__}: {error}")
    self.reason = reason


def _parse(raw: bytes, tokenizer: glm.GLMTokenizer, image_size: int,
           draft: bool) -> dict[str, Any]:
  """One record -> model example with a uint8 image; raises _Failure."""
  if isinstance(raw, _Unreadable):
    raise _Failure(BAD_RECORD, raw.error)
  try:
    rec = records.decode_record(raw)
    example_id = int(rec["id"])
  except (records.RecordError, TypeError, ValueError) as e:
    raise _Failure(BAD_RECORD, e) from e
  caption = rec["caption"]
  if not isinstance(caption, str) or not caption.strip():
    raise _Failure(BAD_CAPTION, ValueError(f"caption is {caption!r}"))
  if not isinstance(rec["image"], bytes):
    raise _Failure(BAD_IMAGE, TypeError(f"image is {type(rec['image']).__name__}"))
  try:
    image = image_ops.decode_image(rec["image"], image_size, draft=draft)
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, ...).
    raise _Failure(BAD_IMAGE, e) from e
  text, text_mask = tokenizer.encode(caption)
  return {"image": image, "text": text, "text_mask": text_mask,
          "id": np.int64(example_id)}


class _Skipper:
  """Counts and logs failures; stops a stream that only fails."""

  def __init__(self, files: Sequence[str]):
    self.locate = _Locator(files)
    self._in_a_row = 0

  def ok(self) -> None:
    self._in_a_row = 0

  def fail(self, index: int, failure: _Failure) -> None:
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

  def __init__(self, file_index: int, reason: str):
    self.file_index, self.reason = file_index, REASONS.index(reason)


class _TrainExample:
  """map_with_index fn at the source: (global index, bytes) -> example | _Skip."""

  def __init__(self, tokenizer: glm.GLMTokenizer, image_size: int,
               files: Sequence[str], num_records: int):
    self.tokenizer = tokenizer
    self.image_size = image_size
    self.num_records = num_records
    self.skipper = _Skipper(files)

  def __call__(self, index: int, raw: bytes) -> dict[str, Any] | _Skip:
    index %= self.num_records  # Later epochs index past the end.
    try:
      example = _parse(raw, self.tokenizer, self.image_size, draft=True)
    except _Failure as f:
      self.skipper.fail(index, f)
      return _Skip(self.skipper.locate(index)[0], f.reason)
    self.skipper.ok()
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


class _Accounting(grain.IterDataset):
  """The last stage: counts what was served and skipped, and enforces the skip limit."""

  def __init__(self, parent: grain.IterDataset, files: Sequence[str],
               unreadable: Sequence[str], records_per_pass: int,
               max_skip_fraction: float):
    super().__init__(parent)
    self._args = (list(files), list(unreadable), records_per_pass,
                  max_skip_fraction)

  def __iter__(self) -> "TrainIterator":
    return TrainIterator(self._parent.__iter__(), *self._args)


class TrainIterator(grain.DatasetIterator):
  """The training iterator: batches without "skipped", plus `stats()` and `ids_sha256`.

  Its state holds the counts and the digest next to the pipeline's position,
  so a resumed run reports what an uninterrupted one would.
  """

  def __init__(self, parent: grain.DatasetIterator, files: list[str],
               unreadable: list[str], records_per_pass: int,
               max_skip_fraction: float):
    super().__init__(parent)
    self.files, self.unreadable = files, unreadable
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
      self.skipped[REASONS[reason]] += 1
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
    raise DataQualityError(
        f"{bad} of {seen} records skipped ({bad / seen:.1%}), more than "
        f"data.max_skip_fraction={self.max_skip_fraction}: worst shard "
        f"{self.files[worst]} ({count} skipped); {dict(self.skipped)}. Fix or "
        "remove the shard (the log names each bad record), or raise "
        "data.max_skip_fraction")

  def stats(self) -> dict[str, int]:
    """Records served and skipped (by reason), and shard files left out."""
    out = {"data/served": self.served, "data/skipped": sum(self.skipped.values()),
           "data/skipped_shards": len(self.unreadable)}
    out.update({f"data/skipped/{r}": self.skipped[r] for r in REASONS})
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


def _collate(examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  batch = {
      "image": image_ops.normalize(np.stack([e["image"] for e in examples])),
      "text": np.stack([e["text"] for e in examples]),
      "text_mask": np.stack([e["text_mask"] for e in examples]),
      "id": np.asarray([e["id"] for e in examples], dtype=np.int64),
  }
  if "valid" in examples[0]:
    batch["valid"] = np.asarray([e["valid"] for e in examples], dtype=bool)
  if "skipped" in examples[0]:
    batch["skipped"] = np.asarray(
        [s for e in examples for s in e["skipped"]], np.int64).reshape(-1, 2)
  return batch


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


class _ProcessRows(grain.MapDataset):
  """Rows [p*b, (p+1)*b) of every global batch of B = b * process_count records."""

  def __init__(self, parent: grain.MapDataset, batch_size: int,
               process_index: int, process_count: int):
    super().__init__(parent)
    self._b = batch_size
    self._global = batch_size * process_count
    self._offset = batch_size * process_index
    self._length = len(parent) // self._global * batch_size

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    k, row = divmod(index, self._b)
    return self._parent[k * self._global + self._offset + row]

  def __str__(self) -> str:
    return f"ProcessRows(b={self._b}, B={self._global}, offset={self._offset})"


def train_dataset(files: list[str], *, tokenizer: glm.GLMTokenizer,
                  image_size: int, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1,
                  worker_count: int = 0, shuffle: bool = True,
                  num_epochs: int | None = None,
                  max_skip_fraction: float = 1.0) -> grain.IterDataset:
  """The training stream of this process's batches.

  Args:
    files: ArrayRecord shards; their order defines the global record index.
      Or any random-access source of record bytes (`len`, `[i]`), such as
      `bigvl.data.sources.VirtualSource`.
    tokenizer: text tokenizer (pickled into worker processes).
    image_size: square output size.
    batch_size: per-process batch size; partial batches are dropped.
    seed: shuffle seed; the same seed gives the same stream.
    process_index: this process's index in [0, process_count).
    process_count: number of processes sharing the data.
    worker_count: grain worker processes; 0 decodes in threads of this one.
    shuffle: shuffle records (anew each epoch).
    num_epochs: passes over all records; None repeats forever.
    max_skip_fraction: the share of bad records (and of unreadable shard
      files) above which the stream raises `DataQualityError`.

  Returns:
    A grain IterDataset; `iter()` gives a checkpointable `TrainIterator` of
    {"image": f32 (b,H,W,3) in [-1,1], "text": i32 (b,L), "text_mask": i32
    (b,L), "id": i64 (b,)}.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  source = None if isinstance(files, (list, tuple)) else files
  files, unreadable = _readable_files(files) if source is None else ([], [])
  if unreadable and (not files or
                     len(unreadable) > max_skip_fraction * (len(files) + len(unreadable))):
    raise DataQualityError(
        f"{len(unreadable)} of {len(files) + len(unreadable)} shard files cannot be read, "
        f"more than data.max_skip_fraction={max_skip_fraction}: first {unreadable[0]} "
        "(rewrite it with launch/build_shards.py, or leave it out of the glob)")
  source = _TolerantSource(files) if source is None else source
  n = len(source)
  per_process = n // process_count
  if per_process == 0:
    raise ValueError(f"{n} records cannot feed {process_count} processes")
  ds = grain.MapDataset.source(source).map_with_index(
      _TrainExample(tokenizer, image_size, files, n))
  if shuffle:
    ds = ds.shuffle(seed=_shuffle_seed(seed))
  ds = _ProcessRows(ds.repeat(num_epochs), batch_size, process_index,
                    process_count)
  it = _AttachSkips(ds.to_iter_dataset(READ_OPTIONS)).batch(
      batch_size, drop_remainder=True, batch_fn=_collate)
  if worker_count > 0:
    _ensure_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return _Accounting(it, files, unreadable, per_process, max_skip_fraction)


def resume_state(fresh_state: dict[str, Any], global_batches: int,
                 batch_size: int) -> dict[str, Any]:
  """The state of a `train_dataset` iterator that has yielded `global_batches` batches.

  `fresh_state` is `get_state()` of a new iterator of this process's stream
  (any worker count). This is how a run resumes with another number of
  processes: a checkpoint holds one position per process, but all processes
  walk the same global stream, so global batch k is a position in any process
  count. Records skipped as bad before k are not accounted for: the counts and
  the ids digest start again here.
  """
  state = dict(fresh_state)
  if "pipeline" in state:  # TrainIterator: the position and its counts.
    state["pipeline"] = resume_state(state["pipeline"], global_batches,
                                     batch_size)
    return state
  if "iterators_in_use_states" in state:
    # Worker processes: worker w reads records w, w + W, ... of this process's
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
  """k-th example of this process, or a padding example marked invalid."""

  def __init__(self, source: grain.sources.ArrayRecordDataSource,
               tokenizer: glm.GLMTokenizer, image_size: int,
               files: Sequence[str], process_index: int, process_count: int):
    self.source = source
    self.tokenizer = tokenizer
    self.image_size = image_size
    self.process_index = process_index
    self.process_count = process_count
    self.skipper = _Skipper(files)
    text, mask = tokenizer.encode("")  # A non-empty mask keeps attention finite.
    self.padding = {"image": np.zeros((image_size, image_size, 3), np.uint8),
                    "text": text, "text_mask": mask, "id": np.int64(-1),
                    "valid": False}

  def __call__(self, k: int) -> dict[str, Any]:
    index = self.process_index + k * self.process_count
    if index >= len(self.source):
      return dict(self.padding)
    try:
      # No JPEG draft: evaluation should see the reference's pixels.
      example = _parse(self.source[index], self.tokenizer, self.image_size,
                       draft=False)
    except _Failure as f:
      self.skipper.fail(index, f)
      return dict(self.padding)
    self.skipper.ok()
    example["valid"] = True
    return example


def eval_examples(files: list[str], *, tokenizer: glm.GLMTokenizer,
                  image_size: int, batch_size: int, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Every record once, in file order, as batches with a "valid" mask.

  Process p reads records p, p + P, p + 2P, ...; all processes yield the same
  number of batches, padded with examples whose "valid" is False (id -1).
  Records that fail to decode also come out invalid, so positions stay fixed.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  source = grain.sources.ArrayRecordDataSource(list(files))
  per_process = math.ceil(len(source) / process_count)
  total = math.ceil(per_process / batch_size) * batch_size
  ds = grain.MapDataset.range(total).map(_EvalExample(
      source, tokenizer, image_size, files, process_index, process_count))
  return iter(ds.to_iter_dataset().batch(batch_size, batch_fn=_collate))


def preprocess_image(data: bytes, image_size: int) -> np.ndarray:
  """One encoded image -> float32 (size, size, 3) in [-1, 1], as in eval."""
  return image_ops.normalize(
      image_ops.decode_image(data, image_size, draft=False))


def load_examples(files: list[str]) -> list[dict[str, Any]]:
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
