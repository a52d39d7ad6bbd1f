"""The training stream over several blocks (processes): one global stream, resumable at any block count."""

from __future__ import annotations

import numpy as np
import pytest

from bigvl.data import sources, stream
from bigvl.data.formats import image_text


class ByteTokenizer:
  """Caption bytes as ids: enough for the pipeline, no SentencePiece model needed."""

  def encode(self, text: str):
    ids = np.zeros(8, np.int32)
    b = list(text.encode()[:8])
    ids[:len(b)] = b
    return ids, (ids > 0).astype(np.int32)


SOURCE = sources.VirtualSource.uniform(52, 3)  # 52 records: global batches of 8 straddle epochs


def _stream(batch_size, block=0, blocks=1, **kw):
  return iter(image_text.train_dataset(
      SOURCE, tokenizer=ByteTokenizer(), image_size=8, batch_size=batch_size, seed=1,
      block=block, blocks=blocks, **kw))


def _ids(it, n):
  return [next(it)["id"].tolist() for _ in range(n)]


@pytest.mark.parametrize("blocks", [2, 4])
def test_global_batches_do_not_depend_on_the_block_count(blocks):
  single = _ids(_stream(8), 10)
  parts = [_ids(_stream(8 // blocks, p, blocks), 10) for p in range(blocks)]
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
    assert stream.resume_state(fresh, k, 4)["pipeline"] == it.get_state()["pipeline"], k
    next(it)
  it.close() if hasattr(it, "close") else None


def test_a_position_moves_to_another_block_count():
  k = 3
  parts = [_stream(4, p, 2) for p in range(2)]
  for part in parts:
    _ids(part, k)
  after_two = sum((_ids(part, 2) for part in parts), [])
  one = _stream(8)
  one.set_state(stream.resume_state(one.get_state(), k, 8))
  after_one = _ids(one, 2)
  assert after_one == [after_two[0] + after_two[2], after_two[1] + after_two[3]]
