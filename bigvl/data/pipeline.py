"""Grain input pipelines over ArrayRecord image-caption shards.

Training stream (`train_dataset`):
  source -> decode (by global record index) -> this process's shard ->
  index shuffle -> repeat -> drop bad records -> batch -> [worker processes]
Everything before batching is index-based (`MapDataset`), so shuffling needs
constant memory and the iterator state is a handful of integers; restoring it
resumes at the exact next batch. Decoding sits at the source level only so it
knows the global record index (for error reports); it runs lazily, when the
shuffled stream asks for that record.

Each process takes a strided, equal-sized slice of the records (the last
`n % process_count` records are left out) so that every process yields the
same number of batches, which collective training steps need. Epoch e is
shuffled with seed (s + e) where s is derived from `seed`, so epochs differ and
are reproducible. The stream depends on `worker_count` (grain slices the
stream per worker), but is deterministic for a fixed count.

Bad records (invalid msgpack, unreadable image, empty caption) are dropped,
logged with their file and index, and counted in `skipped_counts()` (per
process: worker processes keep their own counts; the log is the full record).
"""

from __future__ import annotations

import bisect
import collections
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

_skipped: collections.Counter[str] = collections.Counter()
_skipped_lock = threading.Lock()

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


class _Failure(Exception):
  def __init__(self, reason: str, error: Exception):
    super().__init__(f"{reason}: {type(error).__name__}: {error}")
    self.reason = reason


def _parse(raw: bytes, tokenizer: glm.GLMTokenizer, image_size: int,
           draft: bool) -> dict[str, Any]:
  """One record -> model example with a uint8 image; raises _Failure."""
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


class _TrainExample:
  """map_with_index fn at the source: (global index, bytes) -> example | None."""

  def __init__(self, tokenizer: glm.GLMTokenizer, image_size: int,
               files: Sequence[str], num_records: int):
    self.tokenizer = tokenizer
    self.image_size = image_size
    self.num_records = num_records
    self.skipper = _Skipper(files)

  def __call__(self, index: int, raw: bytes) -> dict[str, Any] | None:
    index %= self.num_records  # Later epochs index past the end.
    try:
      example = _parse(raw, self.tokenizer, self.image_size, draft=True)
    except _Failure as f:
      self.skipper.fail(index, f)
      return None  # Grain drops Nones before batching.
    self.skipper.ok()
    return example


def _collate(examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  batch = {
      "image": image_ops.normalize(np.stack([e["image"] for e in examples])),
      "text": np.stack([e["text"] for e in examples]),
      "text_mask": np.stack([e["text_mask"] for e in examples]),
      "id": np.asarray([e["id"] for e in examples], dtype=np.int64),
  }
  if "valid" in examples[0]:
    batch["valid"] = np.asarray([e["valid"] for e in examples], dtype=bool)
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


def train_dataset(files: list[str], *, tokenizer: glm.GLMTokenizer,
                  image_size: int, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1,
                  worker_count: int = 0, shuffle: bool = True,
                  num_epochs: int | None = None) -> grain.IterDataset:
  """The training stream of this process's batches.

  Args:
    files: ArrayRecord shards; their order defines the global record index.
    tokenizer: text tokenizer (pickled into worker processes).
    image_size: square output size.
    batch_size: per-process batch size; partial batches are dropped.
    seed: shuffle seed; the same seed gives the same stream.
    process_index: this process's index in [0, process_count).
    process_count: number of processes sharing the data.
    worker_count: grain worker processes; 0 decodes in threads of this one.
    shuffle: shuffle records (anew each epoch).
    num_epochs: passes over this process's shard; None repeats forever.

  Returns:
    A grain IterDataset; `iter()` gives a checkpointable DatasetIterator of
    {"image": f32 (b,H,W,3) in [-1,1], "text": i32 (b,L), "text_mask": i32
    (b,L), "id": i64 (b,)}.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  source = grain.sources.ArrayRecordDataSource(list(files))
  n = len(source)
  per_process = n // process_count
  if per_process == 0:
    raise ValueError(f"{n} records cannot feed {process_count} processes")
  ds = grain.MapDataset.source(source).map_with_index(
      _TrainExample(tokenizer, image_size, files, n))
  ds = ds[process_index:per_process * process_count:process_count]
  if shuffle:
    ds = ds.shuffle(seed=_shuffle_seed(seed))
  ds = ds.repeat(num_epochs)
  it = ds.to_iter_dataset().batch(batch_size, drop_remainder=True,
                                  batch_fn=_collate)
  if worker_count > 0:
    _ensure_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it


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
