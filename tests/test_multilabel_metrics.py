"""Multi-label metrics (AP, mAP, top-k CP/CR/CF1/OP/OR/OF1, chance mAP) against brute-force and
hand-computed references, and the official VQA answer normalisation and soft accuracy."""

import itertools
import math

import numpy as np
import pytest

from bigvl.evaluators import multilabel_metrics as mm
from bigvl.evaluators import vqa_metrics as vm


def brute_force_ap(scores, targets):
  """AP as its definition reads, for tie-free scores: per positive, the fraction of positives
  among the items scored at least as high."""
  keep = [i for i, t in enumerate(targets) if t >= 0]
  precisions = []
  for j in keep:
    if targets[j] == 1:
      above = [i for i in keep if scores[i] >= scores[j]]
      precisions.append(sum(targets[i] == 1 for i in above) / len(above))
  return sum(precisions) / len(precisions) if precisions else float("nan")


def test_ap_matches_brute_force_on_random_data():
  rng = np.random.default_rng(0)
  for trial in range(40):
    n = int(rng.integers(1, 30))
    scores = rng.permutation(n) + rng.random(n) * 0.5        # distinct
    targets = rng.choice([-1, 0, 1], size=n, p=[0.15, 0.55, 0.3])
    got, want = mm.average_precision(scores, targets), brute_force_ap(scores, targets)
    if math.isnan(want):
      assert math.isnan(got), trial
    else:
      assert got == pytest.approx(want, abs=1e-12), trial


def test_ap_hand_cases_ties_and_ignored():
  assert mm.average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
  assert mm.average_precision([0.9, 0.8, 0.7, 0.6], [0, 0, 0, 1]) == pytest.approx(0.25)
  assert mm.average_precision([1, 2, 3], [1, 1, 1]) == 1.0
  # An ignored item drops out: the high-scored -1 costs nothing, unlike a negative there.
  assert mm.average_precision([0.9, 0.8, 0.7], [-1, 0, 1]) == pytest.approx(0.5)
  assert mm.average_precision([0.9, 0.8, 0.7], [0, 0, 1]) == pytest.approx(1 / 3)
  # Ties: the stable descending sort ranks the earlier index first.
  assert mm.average_precision([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
  assert mm.average_precision([0.5, 0.5], [1, 0]) == 1.0
  assert math.isnan(mm.average_precision([0.3, 0.2], [0, -1]))


def test_map_per_class_and_classes_scored():
  scores = np.array([[0.9, 0.1, 0.5], [0.8, 0.7, 0.4], [0.7, 0.2, 0.3], [0.6, 0.9, 0.2]])
  targets = np.array([[1, 0, 0], [0, 1, -1], [1, 0, 0], [0, 0, 0]])
  out = mm.mean_average_precision(scores, targets)
  assert out["classes_scored"] == 2
  assert out["per_class"].shape == (3,)
  assert out["per_class"][0] == pytest.approx((1 + 2 / 3) / 2)
  assert out["per_class"][1] == pytest.approx(0.5)
  assert math.isnan(out["per_class"][2])
  assert out["map"] == pytest.approx(((1 + 2 / 3) / 2 + 0.5) / 2)
  assert math.isnan(mm.mean_average_precision(scores, np.zeros((4, 3)))["map"])


def test_bad_scores_and_targets_raise_one_line():
  with pytest.raises(ValueError, match=r"2 non-finite"):
    mm.average_precision([0.1, float("nan"), float("inf")], [1, 0, 1])
  with pytest.raises(ValueError, match=r"1 non-finite"):
    mm.mean_average_precision(np.array([[0.1, np.nan]]), np.array([[1, 0]]))
  with pytest.raises(ValueError, match="targets must be 1, 0 or -1"):
    mm.average_precision([0.1, 0.2], [2, 0])
  with pytest.raises(ValueError, match="shape"):
    mm.average_precision([0.1, 0.2], [1])
  with pytest.raises(ValueError, match="k must be"):
    mm.topk_f1(np.zeros((2, 3)), np.zeros((2, 3)), k=4)


def test_topk_f1_hand_case():
  scores = np.array([[0.9, 0.8, 0.1, 0.0],     # predicts classes 0, 1
                     [0.1, 0.9, 0.8, 0.0],     # 1, 2 (2 is ignored for this image)
                     [0.7, 0.1, 0.2, 0.9]])    # 3, 0
  targets = np.array([[1, 0, 0, 1],
                      [0, 1, -1, 0],
                      [1, 0, 0, 0]])
  out = mm.topk_f1(scores, targets, k=2)
  # Per class (TP, predicted, positives): (2, 2, 2), (1, 2, 1), (0, 0, 0), (0, 1, 1).
  cp, cr = (1 + 0.5 + 0 + 0) / 4, (1 + 1 + 0) / 3
  op, o_r = 3 / 5, 3 / 4
  assert out["cp"] == pytest.approx(cp) and out["cr"] == pytest.approx(cr)
  assert out["cf1"] == pytest.approx(2 * cp * cr / (cp + cr))
  assert out["op"] == pytest.approx(op) and out["or"] == pytest.approx(o_r)
  assert out["of1"] == pytest.approx(2 / 3)
  assert set(out) == {"cp", "cr", "cf1", "op", "or", "of1"}
  perfect = mm.topk_f1(np.array([[0.9, 0.1], [0.2, 0.8]]), np.eye(2), k=1)
  assert all(v == 1.0 for v in perfect.values())


def test_chance_ap_is_exact_by_enumeration():
  for n, p in [(1, 1), (2, 1), (5, 1), (6, 2), (7, 3), (6, 6)]:
    aps = []
    for positions in itertools.combinations(range(n), p):
      targets = np.zeros(n, dtype=int)
      targets[list(positions)] = 1
      aps.append(mm.average_precision(-np.arange(n, dtype=float), targets))
    assert mm.chance_ap(n, p) == pytest.approx(np.mean(aps), abs=1e-12), (n, p)
  assert mm.chance_ap(10, 1) == pytest.approx(sum(1 / r for r in range(1, 11)) / 10)
  assert math.isnan(mm.chance_ap(4, 0))


def test_chance_map_matches_monte_carlo():
  rng = np.random.default_rng(1)
  targets = rng.choice([-1, 0, 1], size=(40, 3), p=[0.1, 0.7, 0.2])
  targets[:, 2] = 0                    # a class without positives is left out
  targets[:3, 0] = 1
  want = mm.chance_map(targets)
  draws = [mm.mean_average_precision(rng.random((40, 3)), targets)["map"] for _ in range(3000)]
  # The standard error of the mean of 3000 draws is about 0.002 here.
  assert np.mean(draws) == pytest.approx(want, abs=0.012)
  p = (targets == 1).sum(0)
  n = (targets >= 0).sum(0)
  assert want == pytest.approx(np.mean([mm.chance_ap(int(n[c]), int(p[c])) for c in (0, 1)]))
  assert math.isnan(mm.chance_map(np.zeros((5, 2))))


# -------------------------------------------------------------------------------------- VQA
@pytest.mark.parametrize("raw, want", [
    ("Two dogs.", "2 dogs"),
    ("  The cat\n", "cat"),
    ("an apple\tpie", "apple pie"),
    ("none", "0"),
    ("dont know", "don't know"),
    ("Isnt it", "isn't it"),
    ("it's", "it's"),
    ("1,000", "1000"),                 # a comma between digits: every mark deleted
    ("black/white", "black white"),    # no mark beside a space: marks become spaces
    ("black / white", "black white"),  # a mark beside a space: deleted
    ("t-shirt", "t shirt"),
    ("yes!", "yes"),
    ("2.5", "2.5"),
    ("u.s.a.", "usa"),
    ("3.", "3"),
    ("10:30", "10:30"),
    ("(left)", "left"),
])
def test_normalize_answer(raw, want):
  assert vm.normalize_answer(raw) == want


def loo_reference(prediction, answers):
  """The official loop: each annotator left out in turn, min(1, matches among the rest / 3)."""
  pred = vm.normalize_answer(prediction)
  accs = []
  for j in range(len(answers)):
    others = answers[:j] + answers[j + 1:]
    accs.append(min(1.0, sum(vm.normalize_answer(a) == pred for a in others) / 3))
  return sum(accs) / len(accs)


def test_soft_accuracy_ten_answers():
  for m, want in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
    answers = ["2"] * m + ["3"] * (10 - m)
    assert vm.soft_accuracy("Two", answers) == pytest.approx(want), m
    assert vm.soft_accuracy("two", answers) == pytest.approx(loo_reference("two", answers))
  mixed = ["red", "red", "dark red", "Red.", "maroon", "red", "pink", "red", "crimson", "red"]
  assert vm.soft_accuracy("red", mixed) == pytest.approx(1.0)
  assert vm.soft_accuracy("maroon", mixed) == pytest.approx(0.3)
  assert vm.soft_accuracy("The Cat", ["cat"]) == 1.0
  assert vm.soft_accuracy("dog", ["cat"]) == 0.0
  assert vm.vqa_accuracy(["2", "dog"], [["2"] * 3 + ["1"] * 7, ["cat"]]) == pytest.approx(0.45)
  with pytest.raises(ValueError, match="2 predictions for 1"):
    vm.vqa_accuracy(["a", "b"], [["a"]])
  with pytest.raises(ValueError, match="non-empty"):
    vm.soft_accuracy("a", [])
