"""The training stream over several processes: one global stream, resumable at any process count."""

from __future__ import annotations

import numpy as np
import pytest

from bigvl.data import pipeline, sources


class ByteTokenizer:
  """Caption bytes as ids: enough for the pipeline, no SentencePiece model needed."""

  def encode(self, text: str):
    ids = np.zeros(8, np.int32)
    b = list(text.encode()[:8])
    ids[:len(b)] = b
    return ids, (ids > 0).astype(np.int32)


SOURCE = sources.VirtualSource.uniform(52, 3)  # 52 records: global batches of 8 straddle epochs


def _stream(batch_size, process_index=0, process_count=1, **kw):
  return iter(pipeline.train_dataset(
      SOURCE, tokenizer=ByteTokenizer(), image_size=8, batch_size=batch_size, seed=1,
      process_index=process_index, process_count=process_count, **kw))


def _ids(it, n):
  return [next(it)["id"].tolist() for _ in range(n)]


@pytest.mark.parametrize("process_count", [2, 4])
def test_global_batches_do_not_depend_on_the_process_count(process_count):
  single = _ids(_stream(8), 10)
  parts = [_ids(_stream(8 // process_count, p, process_count), 10) for p in range(process_count)]
  joined = [sum((part[k] for part in parts), []) for k in range(10)]
  assert joined == single
  # Ten batches of 8 cover the 52 records of epoch 0 once, then go on into epoch 1.
  flat = sum(single, [])
  assert sorted(flat[:52]) == list(range(52))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_state_is_the_state_after_k_batches(workers):
  it = _stream(4, worker_count=workers)
  fresh = it.get_state()
  for k in range(5):
    assert pipeline.resume_state(fresh, k, 4)["pipeline"] == it.get_state()["pipeline"], k
    next(it)
  it.close() if hasattr(it, "close") else None


def test_a_position_moves_to_another_process_count():
  k = 3
  parts = [_stream(4, p, 2) for p in range(2)]
  for part in parts:
    _ids(part, k)
  after_two = sum((_ids(part, 2) for part in parts), [])
  one = _stream(8)
  one.set_state(pipeline.resume_state(one.get_state(), k, 8))
  after_one = _ids(one, 2)
  assert after_one == [after_two[0] + after_two[2], after_two[1] + after_two[3]]
