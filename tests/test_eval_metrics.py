"""Metric functions on hand-built matrices whose values were worked out by hand."""

import numpy as np
import pytest

from bigvl.evaluators import metrics


def test_topk_accuracy_by_hand():
  logits = np.array([[0.9, 0.1, 0.0],    # label 0: rank 0
                     [0.5, 0.4, 0.6],    # label 1: two classes above → rank 2
                     [0.3, 0.3, 0.1]])   # label 1: tie with class 0 → pessimistic rank 1
  labels = np.array([0, 1, 1])
  assert metrics.topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
  assert metrics.topk_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
  assert metrics.topk_accuracy(logits, labels, 3) == pytest.approx(1.0)


def test_collapsed_model_is_not_perfect():
  sim = np.zeros((4, 4))
  r = metrics.retrieval_recalls(sim, np.arange(4), ks=(1,))
  assert r["i2t/r1"] == 0.0 and r["t2i/r1"] == 0.0


def test_retrieval_multiple_captions_by_hand():
  # 3 images; texts 0,1 → image 0; text 2 → image 1; texts 3,4 → image 2 (text 4 repeats text 3).
  text_image = np.array([0, 0, 1, 2, 2])
  sim = np.array([
      # t0   t1   t2   t3   t4
      [0.1, 0.8, 0.9, 0.2, 0.2],   # img0: best positive t1 (0.8) below t2 (0.9) → rank 1
      [0.0, 0.0, 0.5, 0.6, 0.6],   # img1: t2 (0.5) below t3, t4 → rank 2
      [0.3, 0.1, 0.2, 0.7, 0.7],   # img2: t3/t4 tie with each other (both positive) → rank 0
  ])
  r = metrics.retrieval_recalls(sim, text_image, ks=(1, 2, 3))
  assert r["i2t/r1"] == pytest.approx(1 / 3)
  assert r["i2t/r2"] == pytest.approx(2 / 3)
  assert r["i2t/r3"] == pytest.approx(1.0)
  # t2i ranks: t0 → img0 0.1 vs 0.0, 0.3 → rank 1; t1 → 0.8 vs 0.0, 0.1 → 0; t2 → img1 0.5 vs 0.9 → 1;
  # t3 → img2 0.7 vs 0.2, 0.6 → 0; t4 → same → 0.
  assert r["t2i/r1"] == pytest.approx(3 / 5)
  assert r["t2i/r2"] == pytest.approx(1.0)
  assert r["mr"] == pytest.approx(np.mean([1 / 3, 2 / 3, 1, 3 / 5, 1, 1]))


def test_retrieval_ties_count_against():
  text_image = np.array([0, 1])
  sim = np.array([[0.5, 0.5], [0.2, 0.9]])
  r = metrics.retrieval_recalls(sim, text_image, ks=(1,))
  assert r["i2t/r1"] == pytest.approx(0.5)   # img0 ties its negative
  assert r["t2i/r1"] == pytest.approx(1.0)   # t0: 0.5 > 0.2; t1: 0.9 > 0.5


def test_retrieval_chance():
  c = metrics.retrieval_chance(10, np.repeat(np.arange(10), 2), 1)
  assert c["i2t/r1"] == pytest.approx(2 / 20)
  assert c["t2i/r1"] == pytest.approx(1 / 10)


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match="text_image"):
    metrics.retrieval_recalls(np.zeros((2, 3)), np.array([0, 1]))
  with pytest.raises(ValueError, match="at least one text"):
    metrics.retrieval_recalls(np.zeros((2, 2)), np.array([0, 0]))


def test_retrieval_repeated_caption_across_images_by_hand():
  # t0 and t2 are the same string "a dog", captioning image 0 and image 1; identical strings embed
  # identically, so their columns are equal.
  texts = ["a dog", "a cat", "a dog", "a bird"]
  text_image = np.array([0, 0, 1, 2])
  owners = metrics.caption_owners(texts, text_image)
  assert [o.tolist() for o in owners] == [[0, 1], [0], [0, 1], [2]]
  sim = np.array([
      # t0   t1   t2   t3
      [0.9, 0.2, 0.9, 0.1],   # img0: positives t0 t1 t2, best 0.9 (t0 = t2, both positive) → rank 0
      [0.8, 0.3, 0.8, 0.7],   # img1: positives t0 t2 ("a dog" is its caption too), 0.8 → rank 0
      [0.5, 0.6, 0.5, 0.4],   # img2: t3 0.4 below t0, t1, t2 → rank 3
  ])
  r = metrics.retrieval_recalls(sim, owners, ks=(1, 3, 4))
  assert r["i2t/r1"] == pytest.approx(2 / 3)
  assert r["i2t/r3"] == pytest.approx(2 / 3)
  assert r["i2t/r4"] == pytest.approx(1.0)
  # t2i ranks: t0 → best of img0/img1 = 0.9, above img2 0.5 → 0; t1 → img0 0.2 below 0.3, 0.6 → 2;
  # t2 → as t0 → 0; t3 → img2 0.4 below img1 0.7 → 1.
  assert r["t2i/r1"] == pytest.approx(2 / 4)
  assert r["t2i/r3"] == pytest.approx(1.0)
  assert r["mr"] == pytest.approx(np.mean([2 / 3, 2 / 3, 1, 2 / 4, 1, 1]))
  # Counting only each caption's own image would make the equal copies tie as negatives: img0 and
  # img1 drop to rank 1 and t2 (0.8 for img1 vs 0.9 for img0) to rank 1.
  naive = metrics.retrieval_recalls(sim, text_image, ks=(1,))
  assert naive["i2t/r1"] == 0.0 and naive["t2i/r1"] == pytest.approx(1 / 4)
  chance = metrics.retrieval_chance(3, owners, 1)
  assert chance["i2t/r1"] == pytest.approx(np.mean([3 / 4, 2 / 4, 1 / 4]))
  assert chance["t2i/r1"] == pytest.approx(np.mean([2 / 3, 1 / 3, 2 / 3, 1 / 3]))


def test_retrieval_several_captions_and_ties_by_hand():
  # 2 images with 3 captions each; img1's best caption ties a caption of img0.
  text_image = np.array([0, 0, 0, 1, 1, 1])
  sim = np.array([
      [0.6, 0.1, 0.2, 0.3, 0.6, 0.0],   # img0: best positive 0.6 (t0) ties negative t4 → rank 1
      [0.5, 0.2, 0.1, 0.4, 0.3, 0.45],  # img1: best positive 0.45 (t5) below t0 0.5 → rank 1
  ])
  r = metrics.retrieval_recalls(sim, text_image, ks=(1, 2))
  assert r["i2t/r1"] == 0.0 and r["i2t/r2"] == 1.0
  # t2i: t0 0.6 > 0.5 ✓; t1 0.1 < 0.2 ✗; t2 0.2 > 0.1 ✓; t3 0.4 > 0.3 ✓; t4 0.3 < 0.6 ✗;
  # t5 0.45 > 0.0 ✓.
  assert r["t2i/r1"] == pytest.approx(4 / 6)
  assert r["t2i/r2"] == 1.0
  # The chunked comparison gives the same numbers as one block.
  assert metrics.retrieval_recalls(sim, text_image, ks=(1, 2), chunk=1) == r


def test_zero_shot_ties_and_top5_by_hand():
  # 6 classes; row 0: label 2 scores 0.5, tied with class 4, below classes 0 and 1 → rank 3 (top5 ✓,
  # top1 ✗); row 1: label 5 is the lowest of six → rank 5 (top5 ✗).
  logits = np.array([[0.9, 0.8, 0.5, 0.1, 0.5, 0.0],
                     [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])
  labels = np.array([2, 5])
  assert metrics.topk_accuracy(logits, labels, 1) == 0.0
  assert metrics.topk_accuracy(logits, labels, 4) == pytest.approx(1 / 2)
  assert metrics.topk_accuracy(logits, labels, 3) == 0.0     # the tie counts against row 0
  assert metrics.topk_accuracy(logits, labels, 5) == pytest.approx(1 / 2)
