"""The VQA and referring-expression evaluators: on a tiny scene world with fake predictors (an
oracle scores 1, blind ones their baselines), on VQAv2- and RefCOCO-style files written here (scores
computed by hand), and their one-line errors."""

import json
import os
import pickle

import numpy as np
import pytest


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory):
  from data_pipelines import build_scenes
  out = tmp_path_factory.mktemp("scenes") / "s24"
  build_scenes.build(out, num_train=4, num_eval=24, num_shards=1, image_size=24, num_workers=1)
  return str(out)


@pytest.fixture(scope="module")
def tok(tiny_world):
  from bigvl.tokenizers import glm
  return glm.GLMTokenizer(os.path.join(tiny_world, "tokenizer.model"), max_len=24)


@pytest.fixture(scope="module")
def scenes(scene_dir):
  """(pictures (n, 24, 24, 3) uint8, metas, scenes.json) of the evaluation split."""
  from bigvl.evaluators import sources
  data, metas = sources.scenes(scene_dir, "eval", 24)
  return data.images.load(np.arange(len(metas)))["image"], metas, sources.scenes_meta(scene_dir)


def _key(image, ids, mask):
  return image.tobytes(), tuple(int(t) for t in ids[mask > 0])


def _table(tok, items):
  """{(picture bytes, tokens): value} for (picture, text, value) items; keys must not collide."""
  from bigvl.evaluators import common
  t = common.as_written(tok)
  out = {}
  for image, text, value in items:
    k = _key(image, *t.encode(text))
    assert out.setdefault(k, value) == value, text
  return out


class Fake:
  """A predictor on one process: `fn(batch) -> outputs`, run over batches of 5 rows."""

  def __init__(self, name, fn):
    self.names, self.fn, self.batches = (name,), fn, []

  def run(self, name, rows, batch_size=None):
    assert name in self.names
    outs = []
    for lo in range(0, rows.n, 5):
      batch = rows.load(np.arange(lo, min(rows.n, lo + 5)))
      self.batches.append(batch)
      outs.append(self.fn(batch))
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def _answerer(vocab, lookup):
  """An "answer_vqa" predictor answering each row with lookup[(picture, tokens)]."""
  def fn(b):
    assert b["image"].dtype == np.uint8 and b["text"].dtype == np.int32
    logits = np.zeros((len(b["text"]), len(vocab)), np.float32)
    for i, (im, ids, m) in enumerate(zip(b["image"], b["text"], b["text_mask"])):
      logits[i, vocab.index(lookup[_key(im, ids, m)])] = 1.0
    return {"logits": logits}
  return Fake("answer_vqa", fn)


def _build(name, tok, world_dir="", **entry):
  from bigvl.evaluators import build, kinds
  e = kinds.eval_config(**entry)
  kinds.validate_entry(name, e, has_world=True)
  return build.build_one(name, e, tokenizer=tok, image_size=24, world_dir=world_dir)


def _one_line(fn, exc, match):
  with pytest.raises(exc, match=match) as e:
    fn()
  assert "\n" not in str(e.value), str(e.value)
  return str(e.value)


# ---------------------------------------------------------------------------- VQA on the world
def test_vqa_world_oracle_prior_and_chance(scene_dir, tok, scenes, tmp_path):
  from bigvl.evaluators import kinds, vqa
  assert kinds.KINDS["vqa"] is vqa.VQAEvaluator and vqa.VQAEvaluator.requires == ("answer_vqa",)
  images, metas, meta = scenes
  out_file = tmp_path / "pred" / "vqa.jsonl"
  ev = _build("vqa", tok, scene_dir, kind="vqa", output=str(out_file))
  rows = [(i, q, lang) for i, m in enumerate(metas) for q in m["questions"]
          for lang in ("en", "zh")]
  assert len(ev.questions) == len(rows) and ev.vocabulary == meta["answers"]
  truth = _table(tok, [(images[i], q[lang], q["answer"]) for i, q, lang in rows])

  got = ev.run(_answerer(ev.vocabulary, truth))
  types = sorted({q["type"] for _, q, _ in rows})
  assert set(got) == {"vqa/acc", "vqa/chance", "vqa/prior", "vqa/en/acc", "vqa/zh/acc",
                      *(f"vqa/{t}/acc" for t in types)}
  assert all(got[f"vqa/{k}/acc"] == 1.0 for k in ["en", "zh", *types]) and got["vqa/acc"] == 1.0

  # chance: uniform among the answers of each question's type, averaged over rows.
  ta = meta["type_answers"]
  chance = np.mean([1 / len(ta[q["type"]]) for _, q, _ in rows])
  assert got["vqa/chance"] == pytest.approx(chance)
  # prior: the most frequent answer of each type; a blind predictor giving it scores the prior.
  best = {}
  for t in types:
    answers = [q["answer"] for _, q, _ in rows if q["type"] == t]
    best[t] = min(set(answers), key=lambda a: (-answers.count(a), a))
  prior = np.mean([q["answer"] == best[q["type"]] for _, q, _ in rows])
  assert got["vqa/prior"] == pytest.approx(prior)
  blind = _table(tok, [(images[i], q[lang], best[q["type"]]) for i, q, lang in rows])
  assert ev.run(_answerer(ev.vocabulary, blind))["vqa/acc"] == pytest.approx(prior)
  always_yes = ev.run(Fake("answer_vqa", lambda b: {"logits": np.eye(len(ev.vocabulary))[
      np.full(len(b["text"]), ev.vocabulary.index("yes"))]}))
  assert always_yes["vqa/acc"] == pytest.approx(np.mean([q["answer"] == "yes" for _, q, _ in rows]))
  assert always_yes["vqa/colour/acc"] == 0.0

  lines = [json.loads(s) for s in out_file.read_text(encoding="utf-8").splitlines()]
  assert len(lines) == len(rows) and lines[0]["index"] == 0
  assert set(lines[0]) == {"index", "question", "answer", "answers", "type", "lang"}
  assert (lines[1]["question"], lines[1]["lang"]) == (rows[1][1]["zh"], "zh")

  # One language only; an answers file in another order (the logit columns follow it).
  vocab = list(reversed(meta["answers"])) + ["maybe"]
  (tmp_path / "answers.txt").write_text("\n".join(vocab) + "\n\n", encoding="utf-8")
  en = _build("vqa_en", tok, scene_dir, kind="vqa", langs="en",
              answers=str(tmp_path / "answers.txt"))
  assert en.vocabulary == vocab and len(en.questions) == len(rows) // 2
  got = en.run(_answerer(vocab, truth))
  assert got["vqa_en/acc"] == 1.0 and "vqa_en/zh/acc" not in got
  with pytest.raises(ValueError, match=r"answer_vqa gives logits \(\d+, 3\)"):
    en.run(Fake("answer_vqa", lambda b: {"logits": np.zeros((len(b["text"]), 3))}))


def test_vqa_chance_and_prior_by_hand(tok):
  from bigvl.evaluators import common, vqa
  images = common.Rows.of(image=np.zeros((2, 4, 4, 3), np.uint8))
  answers = [["red"], ["blue"], ["blue"], ["yes"], ["no"], ["circle"]]
  types = ["colour", "colour", "colour", "exists", "exists", "shape"]
  ta = {"colour": ["red", "blue", "green", "white"], "exists": ["yes", "no"],
        "shape": ["circle", "square", "star"]}
  chance = vqa.uniform_chance(types, ta)
  assert chance.tolist() == pytest.approx([1 / 4] * 3 + [1 / 2] * 2 + [1 / 3])
  ev = vqa.VQAEvaluator(images=images, image_index=np.array([0, 1, 0, 1, 0, 1]),
                        questions=[f"q{i}" for i in range(6)], answers=answers, types=types,
                        vocabulary=["red", "blue", "yes", "no", "circle"], chance=chance,
                        tokenizer=tok)
  got = ev.run(Fake("answer_vqa", lambda b: {"logits": np.eye(5)[np.zeros(len(b["text"]), int)]}))
  # prior: colour "blue" (2 of 3), exists "no" (a tie: the alphabetically first), shape "circle".
  assert got["vqa/prior"] == pytest.approx((2 / 3 * 3 + 1 + 1) / 6)
  assert got["vqa/chance"] == pytest.approx((3 / 4 + 1 + 1 / 3) / 6)
  assert got["vqa/acc"] == pytest.approx(1 / 6) and got["vqa/colour/acc"] == pytest.approx(1 / 3)
  with pytest.raises(ValueError, match=r"\['count'\] have no answers"):
    vqa.uniform_chance(["count"], ta)


# ------------------------------------------------------------------------------ VQAv2 files
def _vqa_files(tmp_path):
  from PIL import Image
  for iid in (1, 2, 3):
    Image.new("RGB", (16 + iid, 12), (40 * iid, 90, 200)).save(
        tmp_path / f"COCO_val2014_{iid:012d}.jpg")
  qs = [(11, 1, "Is the sky blue?", "yes/no", "is the", ["yes"] * 10, "yes"),
        (12, 1, "How many dogs?", "number", "how many", ["2"] * 3 + ["3"] * 7, "2"),
        (13, 2, "What color is the car?", "other", "what is the", ["red"] + ["blue"] * 9, "red"),
        (14, 3, "What animal is this?", "other", "what is the", ["dog"] * 2 + ["cat"] * 8, "dog"),
        (15, 3, "Are there cats?", "yes/no", "are there", ["no"] * 7 + ["yes"] * 3, "yes")]
  questions = [{"question_id": q, "image_id": i, "question": t} for q, i, t, *_ in qs]
  questions.append({"question_id": 16, "image_id": 1, "question": "Unanswered?"})
  anns = [{"question_id": q, "image_id": i, "answer_type": at, "question_type": qt,
           "multiple_choice_answer": a[0],
           "answers": [{"answer": x, "answer_id": k + 1} for k, x in enumerate(a)]}
          for q, i, _, at, qt, a, _ in qs]
  qpath, apath = tmp_path / "questions.json", tmp_path / "annotations.json"
  qpath.write_text(json.dumps({"data_subtype": "val2014", "questions": questions}))
  apath.write_text(json.dumps({"annotations": anns}))
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("yes\nno\n2\n3\nred\nblue\ndog\ncat\n")
  return qpath, apath, vocab, {t: p for _, _, t, *_, p in qs}


def test_vqa_v2_files_soft_accuracy_by_hand(tok, tmp_path):
  from bigvl.evaluators import common
  qpath, apath, vocab, predicted = _vqa_files(tmp_path)
  out_file = tmp_path / "out.jsonl"
  ev = _build("vqa2", tok, kind="vqa", source=f"vqa:{qpath}", annotations=str(apath),
              answers=str(vocab), output=str(out_file))
  assert len(ev.images) == 3 and len(ev.questions) == 5   # question 16 has no answers
  t = common.as_written(tok)
  by_text = {tuple(t.encode(q)[0]): a for q, a in predicted.items()}

  def fn(b):
    return {"logits": np.eye(len(ev.vocabulary))[
        [ev.vocabulary.index(by_text[tuple(ids)]) for ids in b["text"]]]}
  got = ev.run(Fake("answer_vqa", fn))
  # Soft accuracy, matches of 10: 10 → 1; 3 → 0.9; 1 → 0.3; 2 → 0.6; 3 → 0.9.
  assert got["vqa2/acc"] == pytest.approx((1 + 0.9 + 0.3 + 0.6 + 0.9) / 5)
  assert got["vqa2/yes_no/acc"] == pytest.approx(0.95)
  assert got["vqa2/number/acc"] == pytest.approx(0.9)
  assert got["vqa2/other/acc"] == pytest.approx(0.45)
  # prior (per answer_type): yes (13 of 20), 3, blue → 1, 1, 1, 0 (cat), 0.9 (3 yes of 10).
  assert got["vqa2/prior"] == pytest.approx((1 + 1 + 1 + 0 + 0.9) / 5)
  # chance (per question_type prior): "are there" → no (7 of 10) → 1.
  assert got["vqa2/chance"] == pytest.approx((1 + 1 + 1 + 0 + 1) / 5)
  assert not any("/en/" in k for k in got)
  lines = [json.loads(s) for s in out_file.read_text().splitlines()]
  assert [r["question_id"] for r in lines] == [11, 12, 13, 14, 15]
  assert lines[2]["answer"] == "red" and len(lines[2]["answers"]) == 10
  # max_examples: the first questions with answers.
  assert len(_build("vqa2", tok, kind="vqa", source=f"vqa:{qpath}", annotations=str(apath),
                    answers=str(vocab), max_examples=2).questions) == 2


def test_vqa_errors(tok, tmp_path, scene_dir):
  from bigvl.evaluators import kinds
  qpath, apath, vocab, _ = _vqa_files(tmp_path)
  src = f"vqa:{qpath}"
  msg = _one_line(lambda: _build("v", tok, kind="vqa", source=src,
                                 annotations=str(tmp_path / "missing.json"), answers=str(vocab)),
                  FileNotFoundError, "missing.json")
  assert msg.startswith("evals.v: ")
  _one_line(lambda: _build("v", tok, kind="vqa", source=src, answers=str(vocab)), ValueError,
            r"evals.v.annotations: a vqa: source needs")
  _one_line(lambda: _build("v", tok, kind="vqa", source=src, annotations=str(apath)), ValueError,
            r"evals.v.answers: a vqa: source needs")
  (tmp_path / "none.json").write_text(json.dumps({"annotations": []}))
  none = str(tmp_path / "none.json")
  _one_line(lambda: _build("v", tok, kind="vqa", source=src, annotations=none, answers=str(vocab)),
            ValueError, "no question of .* has answers")
  (tmp_path / "dup.txt").write_text("yes\nno\nred\nno\n")
  _one_line(lambda: _build("v", tok, scene_dir, kind="vqa", answers=str(tmp_path / "dup.txt")),
            ValueError, r"dup.txt:4: answer 'no' is also line 2")
  (tmp_path / "blank.txt").write_text("yes\n\nno\n")
  _one_line(lambda: _build("v", tok, scene_dir, kind="vqa", answers=str(tmp_path / "blank.txt")),
            ValueError, r"blank.txt:2: blank answer")
  _one_line(lambda: _build("v", tok, scene_dir, kind="vqa", answers=str(tmp_path / "no.txt")),
            FileNotFoundError, r"evals.v.answers: no such file")
  for bad, match in ((dict(langs="fr"), r"evals.v.langs='fr'"),
                     (dict(source="coco:" + str(qpath)), r"evals.v.source=.*vqa reads"),
                     (dict(annotations="a.json"), r"evals.v.annotations='a.json': only for")):
    _one_line(lambda: kinds.validate_entry("v", kinds.eval_config(kind="vqa", **bad),
                                           has_world=True), ValueError, match)


# ------------------------------------------------------------------------------------ referring
def test_iou_helper():
  from bigvl.evaluators import referring
  a = np.array([[0, 0, 2, 1], [0, 0, 1, 1], [5, 5, 6, 6]], float)
  assert referring.iou(a[0], np.array([1, 0, 3, 1])) == pytest.approx(1 / 3)
  assert referring.iou(a, a).tolist() == [1, 1, 1]
  m = referring.iou(a[:, None], a[None])
  assert m.shape == (3, 3) and m[0, 1] == pytest.approx(0.5) and m[0, 2] == 0 and m[2, 0] == 0
  assert referring.iou(np.zeros(4), np.zeros(4)) == 0.0    # empty boxes


def _pointer(lookup):
  """A "refer" predictor scoring the candidate lookup[(picture, tokens)] highest."""
  def fn(b):
    assert b["boxes"].dtype == np.float32 and b["box_valid"].dtype == np.int32
    assert (b["boxes"] >= 0).all() and (b["boxes"] <= 1).all()
    scores = np.where(b["box_valid"] > 0, 0.0, 100.0)     # padding scored highest: ignored
    for i, (im, ids, m) in enumerate(zip(b["image"], b["text"], b["text_mask"])):
      scores[i, lookup[_key(im, ids, m)]] = 1.0
    return {"scores": scores}
  return Fake("refer", fn)


def test_referring_world_oracle_and_chance(scene_dir, tok, scenes):
  from bigvl.evaluators import kinds, referring
  assert kinds.KINDS["referring"] is referring.ReferringEvaluator
  images, metas, meta = scenes
  size = meta["params"]["image_size"]
  many = [i for i, m in enumerate(metas) if len(m["objects"]) >= 2]
  assert 0 < len(many) < len(metas)    # the tiny world has scenes of one object, left out
  ev = _build("referring", tok, scene_dir, kind="referring")
  rows = [(i, lang) for i in many for lang in ("en", "zh")]
  assert len(ev.texts) == len(rows) and ev.boxes.shape == (len(rows), max(
      len(metas[i]["objects"]) for i in many), 4)
  first = metas[many[0]]
  np.testing.assert_allclose(ev.boxes[0, :len(first["objects"])],
                             np.array([o["box"] for o in first["objects"]]) / size, rtol=1e-6)
  assert ev.box_valid.sum(1).tolist() == [len(metas[i]["objects"]) for i, _ in rows]

  target = _table(tok, [(images[i], metas[i]["refer"][lang], metas[i]["target"])
                        for i, lang in rows])
  got = ev.run(_pointer(target))
  assert set(got) == {"referring/acc_iou0.5", "referring/mean_iou", "referring/chance",
                      "referring/en/acc_iou0.5", "referring/zh/acc_iou0.5"}
  assert got["referring/acc_iou0.5"] == 1.0 and got["referring/mean_iou"] == pytest.approx(1.0)
  # The objects sit in different quadrants: only the target overlaps itself.
  chance = np.mean([1 / len(metas[i]["objects"]) for i, _ in rows])
  assert got["referring/chance"] == pytest.approx(chance)
  first_box = ev.run(_pointer({k: 0 for k in target}))
  assert first_box["referring/acc_iou0.5"] == pytest.approx(
      np.mean([metas[i]["target"] == 0 for i, _ in rows]))
  assert abs(first_box["referring/acc_iou0.5"] - chance) < 0.35

  two = _build("referring2", tok, scene_dir, kind="referring", max_boxes=2, langs="zh")
  assert two.boxes.shape == (len(many), 2, 4)
  kept = {k: int(np.flatnonzero((two.boxes[j] == two.truth[j]).all(-1))[0])
          for j, k in enumerate(_table(tok, [(images[i], metas[i]["refer"]["zh"], i)
                                             for i in many]))}
  got = two.run(_pointer(kept))
  assert got["referring2/acc_iou0.5"] == 1.0 and "referring2/en/acc_iou0.5" not in got
  assert got["referring2/chance"] == pytest.approx(0.5)


def test_referring_chance_by_hand(tok):
  from bigvl.evaluators import common, referring
  images = common.Rows.of(image=np.zeros((1, 4, 4, 3), np.uint8))
  cands = [np.array([[0, 0, .5, .5], [0, 0, .5, .4], [.5, .5, 1, 1]]),   # IoU 1, 0.8, 0
           np.array([[0, 0, 1, 1], [0, 0, .5, .5]])]                        # IoU 0.25, 1
  ev = referring.ReferringEvaluator(images=images, image_index=np.zeros(2, int),
                                    texts=["a", "b"], candidates=cands, targets=[0, 1],
                                    tokenizer=tok)
  scores = np.array([[0.0, 1, 2], [1, 0, 9]])
  got = ev.run(Fake("refer", lambda b: {"scores": scores[:len(b["text"])]}))
  assert got["referring/chance"] == pytest.approx((2 / 3 + 1 / 2) / 2)
  # Row 0 picks the last box (IoU 0), row 1 the first valid best (IoU 0.25): padding is ignored.
  assert got["referring/acc_iou0.5"] == 0.0
  assert got["referring/mean_iou"] == pytest.approx(0.25 / 2)


def _refcoco_files(tmp_path):
  from PIL import Image
  Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.jpg")
  Image.new("RGB", (50, 20), (10, 10, 200)).save(tmp_path / "b.jpg")
  instances = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
               "annotations": [{"id": 101, "image_id": 1, "bbox": [0, 0, 20, 15]},
                               {"id": 102, "image_id": 1, "bbox": [2, 0, 18, 15]},
                               {"id": 103, "image_id": 1, "bbox": [20, 15, 20, 15]},
                               {"id": 201, "image_id": 2, "bbox": [0, 0, 25, 20]},
                               {"id": 202, "image_id": 2, "bbox": [25, 0, 25, 20]}],
               "categories": [{"id": 1, "name": "thing"}]}
  refs = [{"ref_id": 1, "ann_id": 101, "image_id": 1, "split": "val",
           "sentences": [{"sent": "the left one"}, {"raw": "top left thing"}]},
          {"ref_id": 2, "ann_id": 103, "image_id": 1, "split": "val",
           "sentences": [{"sent": "bottom right"}]},
          {"ref_id": 3, "ann_id": 202, "image_id": 2, "split": "val",
           "sentences": [{"sent": "the right half"}]},
          {"ref_id": 4, "ann_id": 201, "image_id": 2, "split": "testA",
           "sentences": [{"sent": "left half"}]}]
  (tmp_path / "instances.json").write_text(json.dumps(instances))
  (tmp_path / "refs.json").write_text(json.dumps(refs))
  return tmp_path / "refs.json", tmp_path / "instances.json"


def test_refcoco_files_evaluate(tok, tmp_path):
  from bigvl.evaluators import common
  refs, instances = _refcoco_files(tmp_path)
  ev = _build("refcoco", tok, kind="referring", source=f"refcoco:{refs}", instances=str(instances))
  assert len(ev.images) == 2 and ev.texts == ["the left one", "top left thing", "bottom right",
                                             "the right half"]
  np.testing.assert_allclose(ev.boxes[0], [[0, 0, .5, .5], [.05, 0, .5, .5], [.5, .5, 1, 1]])
  np.testing.assert_allclose(ev.boxes[3], [[0, 0, .5, 1], [.5, 0, 1, 1], [0, 0, 0, 0]])
  assert ev.box_valid.tolist() == [[1, 1, 1]] * 3 + [[1, 1, 0]]
  t = common.as_written(tok)
  pick = {tuple(t.encode(s)[0]): k for s, k in [("the left one", 0), ("top left thing", 1),
                                                 ("bottom right", 0), ("the right half", 0)]}

  def fn(b):
    scores = np.where(b["box_valid"] > 0, 0.0, 100.0)
    scores[np.arange(len(scores)), [pick[tuple(ids)] for ids in b["text"]]] = 1.0
    return {"scores": scores}
  got = ev.run(Fake("refer", fn))
  # Chosen: the box itself (IoU 1), its near twin (IoU 0.9), two wrong ones (IoU 0).
  assert got["refcoco/acc_iou0.5"] == pytest.approx(0.5)
  assert got["refcoco/mean_iou"] == pytest.approx((1 + 0.9) / 4)
  assert got["refcoco/chance"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3 + 1 / 2) / 4)
  assert set(got) == {"refcoco/acc_iou0.5", "refcoco/mean_iou", "refcoco/chance"}
  testa = _build("refcoco", tok, kind="referring", source=f"refcoco:{refs}",
                 instances=str(instances), split="testA")
  assert testa.texts == ["left half"] and testa.boxes.shape == (1, 2, 4)


class _Evil:
  def __reduce__(self):
    return (os.system, ("touch PWNED",))


def test_referring_errors(tok, tmp_path):
  from bigvl.evaluators import kinds, public_formats
  refs, instances = _refcoco_files(tmp_path)
  bad = tmp_path / "refs(unc).p"
  with open(bad, "wb") as f:
    pickle.dump([_Evil()], f)
  msg = _one_line(lambda: _build("r", tok, kind="referring", source=f"refcoco:{bad}",
                                 instances=str(instances)),
                  public_formats.UnsafePickleError, r"refs\(unc\).p: refused global")
  assert msg.startswith("evals.r: ") and not os.path.exists("PWNED")
  _one_line(lambda: _build("r", tok, kind="referring", source=f"refcoco:{refs}",
                           instances=str(tmp_path / "gone.json")), FileNotFoundError, "gone.json")
  for entry, match in ((dict(source=f"refcoco:{refs}"), "evals.r.instances: a refcoco: source"),
                       (dict(max_boxes=-1), r"evals.r.max_boxes=-1"),
                       (dict(langs="en,de"), r"evals.r.langs='en,de'"),
                       (dict(source=f"vqa:{refs}"), "referring reads")):
    _one_line(lambda: kinds.validate_entry("r", kinds.eval_config(kind="referring", **entry),
                                           has_world=True), ValueError, match)
