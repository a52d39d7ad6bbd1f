"""Metric functions on hand-built matrices whose values were worked out by hand, and the evaluators
on a hand-built predictor (embeddings chosen per image and per prompt)."""

import numpy as np
import pytest

from bigvl.evaluators import common, metrics


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


class _Tokenizer:
  """Each text's id is its position in `texts` (one token; the mask marks it)."""

  def __init__(self, texts):
    self.texts = list(texts)

  def encode_batch(self, texts):
    ids = np.array([[self.texts.index(t)] for t in texts], np.int32)
    return ids, np.ones_like(ids)


class _Predictor:
  """"embed_image": the rows' "image" is its embedding; "embed_text": `table[id]`. One process, every
  row at once, the PASSTHROUGH columns handed back as the sharded predictor does."""

  def __init__(self, table):
    self.table = np.asarray(table, np.float32)
    self.calls = []

  def run(self, name, rows, batch_size=None):
    self.calls.append(name)
    b = rows.load(np.arange(rows.n))
    emb = b["image"] if name == "embed_image" else self.table[b["text"][:, 0]]
    return {"embedding": np.asarray(emb, np.float32)} | {
        k: b[k] for k in common.PASSTHROUGH if k in b}


def test_zero_shot_evaluator_on_a_hand_built_predictor():
  from bigvl.evaluators.zeroshot import ZeroShotEvaluator
  # Two classes, two templates: class "a" averages (1, 0) and (1, 1) → direction (0.92, 0.38);
  # class "b" is (0, 1) for both prompts.
  prompts = ["x a", "y a", "x b", "y b"]
  table = [[1, 0], [1, 1], [0, 1], [0, 1]]
  # Image 0 (1, 0) → a ✓; image 1 (0.3, 1) → b ✓; image 2 (1, 0.9): a scores 0.92 + 0.34 = 1.27,
  # b 0.9 → a, but its label is b ✗.
  images = np.array([[1, 0], [0.3, 1], [1, 0.9]], np.float32)
  labels = np.array([0, 1, 1])
  tok = _Tokenizer(prompts)
  ev = ZeroShotEvaluator(images=images, labels=labels, classnames={"en": ["a", "b"]},
                         templates={"en": ["x {}", "y {}"]}, tokenizer=tok, prefix="zs")
  predictor = _Predictor(table)
  out = ev.run(predictor)
  assert out["zs/en/top1"] == pytest.approx(2 / 3)
  assert out["zs/en/top5"] == 1.0
  assert out["zs/chance_top1"] == 0.5
  assert predictor.calls == ["embed_image", "embed_text"]
  # Labels carried by the rows (each process reads its own) give the same numbers.
  rows = common.Rows.of(image=images, label=labels)
  ev = ZeroShotEvaluator(images=rows, labels=None, classnames={"en": ["a", "b"]},
                         templates={"en": ["x {}", "y {}"]}, tokenizer=tok, prefix="zs")
  assert ev.run(_Predictor(table)) == out


def test_retrieval_evaluator_on_a_hand_built_predictor():
  from bigvl.evaluators.retrieval import RetrievalEvaluator
  texts = {"en": ["red", "blue"], "zh": ["红", "蓝"]}
  tok = _Tokenizer(texts["en"] + texts["zh"])
  # "red" / "红" point at image 0, "blue" at image 1; "蓝" points at image 0 (a miss).
  table = [[1, 0], [0, 1], [1, 0], [0.9, 0.1]]
  images = np.array([[1, 0], [0, 1]], np.float32)
  ev = RetrievalEvaluator(images=images, texts=texts, text_image={"en": [0, 1], "zh": [0, 1]},
                          tokenizer=tok, prefix="ret")
  out = ev.run(_Predictor(table))
  assert out["ret/en/i2t/r1"] == 1.0 and out["ret/en/t2i/r1"] == 1.0
  assert out["ret/zh/t2i/r1"] == pytest.approx(1 / 2)     # "蓝" retrieves image 0
  # zh i2t: image 0 · 红 = 1 > 蓝 0.9 → hit; image 1 · 蓝 = 0.1 > 红 0 → hit.
  assert out["ret/zh/i2t/r1"] == 1.0
  # Pooled: t2i 3 of 4; i2t: image 1's best positive "blue" (1.0) is the top → both hit.
  assert out["ret/t2i/r1"] == pytest.approx(3 / 4) and out["ret/i2t/r1"] == 1.0
  assert out["ret/chance/t2i/r1"] == pytest.approx(1 / 2)


def _reference_recalls(captions_per_image, img_feats, txt_feat_of):
  """An independent transcription of the reference M²-Encoder eval_retrieval.py (get_data and
  calu_recall, 0-1 ground-truth matrices and a sort of the scores) on prepared captions; the tie
  order of a stable sort. Returns fractions, not percentages."""
  texts, img2txt, txt2img, text_ids = [], {}, {}, {}
  for i, caps in enumerate(captions_per_image):
    for c in caps:
      c = metrics.reference_text(c)
      img2txt.setdefault(i, []).append(c)
      txt2img.setdefault(c, []).append(i)
      texts.append(c)
      text_ids[c] = len(texts) - 1
  n_img = len(captions_per_image)
  i2t_gt = np.zeros((n_img, len(texts)))
  t2i_gt = np.zeros((len(texts), n_img))
  for i in range(n_img):
    for c in img2txt[i]:
      i2t_gt[i, text_ids[c]] = 1
  for j, c in enumerate(texts):
    for i in txt2img[c]:
      t2i_gt[j, i] = 1
  txt_feats = np.stack([txt_feat_of[c] for c in texts])
  out = {}
  for name, mat, gt in (("t2i", txt_feats @ img_feats.T, t2i_gt), ("i2t", img_feats @ txt_feats.T,
                                                                      i2t_gt)):
    order = np.argsort(-mat, axis=1, kind="stable")
    hit = np.take_along_axis(gt, order, axis=1)[:, :10].cumsum(axis=1) > 0
    for k in (1, 5, 10):
      out[f"{name}/r{k}"] = float(hit[:, k - 1].mean())
  return out, texts


def test_retrieval_follows_the_reference_evaluation_exactly():
  """Repeated captions (within and across images, some differing only in case or curly quotes),
  random embeddings: the evaluator's recalls are the reference script's. bigvl's earlier rule
  (image→text counts every copy of a repeated caption) is kept under an option and differs."""
  from bigvl.evaluators.retrieval import RetrievalEvaluator
  rng = np.random.default_rng(0)
  pool = ["a dog", "A Dog", "a cat on a mat", "“quoted” text", '"quoted" text', "two birds",
          "a red car", "a boat", "people walking", "a bowl of fruit"]
  captions = [list(rng.choice(pool, size=rng.integers(1, 4))) for _ in range(12)]
  images = rng.normal(size=(12, 8)).astype(np.float32)
  prepared = sorted({metrics.reference_text(c) for c in pool})
  feat = {c: rng.normal(size=8).astype(np.float32) for c in prepared}
  want, texts = _reference_recalls(captions, images, feat)
  tok = _Tokenizer(prepared)
  table = [feat[c] for c in prepared]
  flat = [c for caps in captions for c in caps]
  owner = [i for i, caps in enumerate(captions) for _ in caps]
  ev = RetrievalEvaluator(images=images, texts={"en": flat}, text_image={"en": owner},
                          tokenizer=tok, prefix="r")
  out = ev.run(_Predictor(table))
  for k in want:
    assert out[f"r/{k}"] == pytest.approx(want[k]), k
  assert ev.texts["en"] == texts                   # lower-cased, quotes straightened, in order
  every = RetrievalEvaluator(images=images, texts={"en": flat}, text_image={"en": owner},
                             tokenizer=tok, prefix="r", repeated_captions="every_copy")
  other = every.run(_Predictor(table))
  assert other["r/t2i/r1"] == out["r/t2i/r1"]
  assert any(other[f"r/i2t/r{k}"] > out[f"r/i2t/r{k}"] for k in (1, 5, 10))


def test_a_nan_similarity_is_an_error_never_a_recall():
  sim = np.eye(3)
  sim[1, 2] = np.nan
  with pytest.raises(metrics.NonfiniteScoresError, match=r"1 NaN or inf values \(first at \[1, 2\]"):
    metrics.retrieval_recalls(sim, np.arange(3))
  with pytest.raises(metrics.NonfiniteScoresError):
    metrics.topk_accuracy(np.full((2, 3), np.nan), np.array([0, 1]), 1)


def test_a_language_need_not_caption_every_image():
  """Image 2 has no Chinese caption: the zh figures are over images 0 and 1, the pooled over all."""
  from bigvl.evaluators.retrieval import RetrievalEvaluator
  texts = {"en": ["red", "blue", "green"], "zh": ["红", "蓝"]}
  tok = _Tokenizer(texts["en"] + texts["zh"])
  table = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0]]
  images = np.eye(3, dtype=np.float32)
  ev = RetrievalEvaluator(images=images, texts=texts,
                          text_image={"en": [0, 1, 2], "zh": [0, 1]}, tokenizer=tok, prefix="ret")
  out = ev.run(_Predictor(table))
  assert out["ret/zh/i2t/r1"] == out["ret/zh/t2i/r1"] == 1.0
  assert out["ret/i2t/r1"] == out["ret/en/i2t/r1"] == 1.0


def test_evaluators_tokenize_text_as_written(tiny_world):
  """The run's tokenizer lower-cases (training), the evaluators' does not: retrieval lower-cases
  in its own preparation, zero-shot keeps class names and templates as written."""
  import os
  from bigvl.evaluators.retrieval import RetrievalEvaluator
  from bigvl.evaluators.zeroshot import ZeroShotEvaluator
  from bigvl.tokenizers import glm
  tok = glm.GLMTokenizer(os.path.join(tiny_world, "tokenizer.model"), max_len=16)
  assert tok.encode("Dog")[0].tolist() == tok.encode("dog")[0].tolist()
  zs = ZeroShotEvaluator(images=np.zeros((1, 2), np.float32), labels=np.array([0]),
                         classnames={"en": ["Dog"]}, templates={"en": ["{}"]}, tokenizer=tok)
  assert zs.tokenizer.encode("Dog")[0].tolist() != tok.encode("Dog")[0].tolist()
  assert zs.tokenizer.encode("dog ")[0].tolist() != zs.tokenizer.encode("dog")[0].tolist()
  ret = RetrievalEvaluator(images=np.zeros((1, 2), np.float32), texts={"en": ["A Dog "]},
                           text_image={"en": [0]}, tokenizer=tok)
  assert ret.texts["en"] == ["a dog "]                          # lower-cased, not stripped
  assert tok.lowercase                                           # the run's own is unchanged
