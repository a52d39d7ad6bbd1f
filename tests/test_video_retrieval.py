"""Video retrieval metrics (bigvl/evaluators/video_retrieval.py) on hand-computed cases: the
multi-sentence protocol (text→video per sentence, video→text by a video's best sentence), ties
against the model, chance, and the tiled similarity."""

import numpy as np
import pytest

from bigvl.evaluators import common
from bigvl.evaluators import video_retrieval as vr


def test_ranks_multi_sentence_by_hand():
  sim = np.array([[0.9, 0.1],
                  [0.2, 0.85],
                  [0.3, 0.8]])
  owner = np.array([0, 0, 1])
  t2v, v2t = vr.ranks(sim, owner)
  assert t2v.tolist() == [0, 1, 0]
  assert v2t.tolist() == [0, 1]      # video 1's only sentence is beaten by sentence 1
  assert vr.rank_metrics(t2v) == pytest.approx(
      {"r1": 2 / 3, "r5": 1.0, "r10": 1.0, "mdr": 1.0, "mnr": 4 / 3})
  assert vr.rank_metrics(v2t) == pytest.approx(
      {"r1": 0.5, "r5": 1.0, "r10": 1.0, "mdr": 1.5, "mnr": 1.5})
  assert vr.chance_r1(2, owner) == pytest.approx({"t2v/r1": 0.5, "v2t/r1": 0.5})


def test_ties_count_against_the_model():
  t2v, v2t = vr.ranks(np.ones((2, 2)), np.array([0, 1]))
  assert t2v.tolist() == [1, 1] and v2t.tolist() == [1, 1]


def test_bad_owners():
  with pytest.raises(ValueError, match="at least one sentence"):
    vr.ranks(np.zeros((2, 3)), np.array([0, 1]))
  with pytest.raises(ValueError, match="one of 2 videos"):
    vr.ranks(np.zeros((2, 2)), np.array([0, 2]))


class _Tiles:
  """A predictor with only score_tiles: a plain dot product of the first token and frame."""

  def run(self, name, rows, batch_size=None):
    assert name == "score_tiles"
    b = rows.load(np.arange(len(rows)))
    return {"sim": np.einsum("kad,kbd->kab", b["t"][:, :, 0], b["v"][:, :, 0])}


def test_tiled_similarity_equals_dense():
  r = np.random.default_rng(0)
  t, v = r.normal(size=(13, 3, 4)), r.normal(size=(7, 2, 4))
  ev = vr.VideoRetrievalEvaluator(videos=common.Rows.of(frames=np.zeros((7, 1))),
                                  captions=[[("en", "x")]] * 7, tokenizer=None,
                                  text_weights=None, tile=4)
  sim = ev.similarity(_Tiles(), t, np.ones((13, 3)), v, np.ones((7, 2), np.int32))
  np.testing.assert_allclose(sim, t[:, 0] @ v[:, 0].T, atol=1e-12)
