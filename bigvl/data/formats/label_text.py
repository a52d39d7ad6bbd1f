"""Sentences with their labels, for classifiers trained on text alone (the text-as-image adapter):
JSON lines `{"text": ..., "labels": [names], "lang": "en"}` as launch/generate_label_sentences.py
writes them, streamed like every other format (`stream.train_stream`: shuffle, resume, blocks, skip
accounting).

A line whose text is empty, or that names a label outside the run's label set, is skipped and
counted (`bad_text`, `unknown_label`), never silently trained on.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Sequence

import grain
import numpy as np

from bigvl.data import stream
from bigvl.tokenizers import glm

BAD_RECORD, BAD_TEXT, UNKNOWN_LABEL = stream.BAD_RECORD, "bad_text", "unknown_label"
REASONS = (BAD_RECORD, BAD_TEXT, UNKNOWN_LABEL)


def read_lines(path: str) -> list[bytes]:
  """The file's non-blank lines as bytes (the stream's records: line k is record k)."""
  with open(path, "rb") as f:
    lines = [line.rstrip(b"\n") for line in f if line.strip()]
  if not lines:
    raise ValueError(f"{path}: no sentences")
  return lines


def _parse(raw: bytes, *, tokenizer: glm.GLMTokenizer, index: dict[str, int]) -> dict[str, Any]:
  try:
    line_no, _, raw = raw.partition(b"\t")
    row = json.loads(raw)
    text, labels = row["text"], row["labels"]
  except (ValueError, KeyError, TypeError) as e:
    raise stream.RecordFailure(BAD_RECORD, e) from e
  if not isinstance(text, str) or not text.strip():
    raise stream.RecordFailure(BAD_TEXT, ValueError(f"text is {text!r}"))
  if not isinstance(labels, list) or not labels:
    raise stream.RecordFailure(BAD_RECORD, ValueError(f"labels are {labels!r}"))
  unknown = [l for l in labels if l not in index]
  if unknown:
    raise stream.RecordFailure(UNKNOWN_LABEL, ValueError(f"labels {unknown} not in the label set"))
  target = np.zeros(len(index), np.float32)
  target[[index[l] for l in labels]] = 1.0
  ids, mask = tokenizer.encode(text)
  return {"text": ids, "text_mask": mask, "labels": target, "id": np.int64(int(line_no))}


def _collate(examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in ("text", "text_mask", "labels", "id")}


def train_dataset(lines: Sequence[bytes], *, tokenizer: glm.GLMTokenizer,
                  label_names: Sequence[str], batch_size: int, seed: int, block: int = 0,
                  blocks: int = 1, worker_count: int = 0,
                  max_skip_fraction: float = 0.05) -> grain.IterDataset:
  """Batches {"text", "text_mask": int32 (b, L), "labels": float32 (b, C) multi-hot, "id"} over
  `lines` (records), with labels indexed by `label_names`."""
  index = {name: i for i, name in enumerate(label_names)}
  parse = functools.partial(_parse, tokenizer=tokenizer, index=index)
  return stream.train_stream(_Lines(list(lines)), parse=parse, collate=_collate, reasons=REASONS,
                             batch_size=batch_size, seed=seed, block=block, blocks=blocks,
                             worker_count=worker_count, max_skip_fraction=max_skip_fraction)


class _Lines:
  """A random-access source of record bytes over lines in memory (not a list: the stream takes a
  list for shard paths); record i is b"i<TAB>" + line i, so every example's id is its line."""

  def __init__(self, lines: list[bytes]):
    self._lines = lines

  def __len__(self) -> int:
    return len(self._lines)

  def __getitem__(self, i: int) -> bytes:
    return b"%d\t" % i + self._lines[i]
