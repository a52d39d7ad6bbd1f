"""Visual question answering as classification over the system's answer vocabulary: the predicted
answer of a question is the vocabulary entry of the largest of its "answer_vqa" logits.

Metrics (prefix = the entry's name): `{prefix}/acc` (mean VQA accuracy, `vqa_metrics.soft_accuracy`:
leave-one-out soft accuracy over VQAv2's ten human answers, exact match against the world's single
answer, both normalised), `{prefix}/{lang}/acc` per question language (world), `{prefix}/{type}/acc`
per question type (world: colour / shape / exists; VQAv2: the answer_type, "yes/no" written
"yes_no", number, other), `{prefix}/prior` (a blind baseline: every question answered with the most
frequent answer of its type in the evaluated set) and `{prefix}/chance`. On the world, chance is
guessing uniformly among the answers a question's type can have (scenes.json type_answers). VQAv2
lists no such answers, so there chance is the per-question_type prior ("what color is the", "how
many", ...: the finer grouping of the VQA paper's "per Q-type prior"), read from the evaluated
annotations themselves: both baselines see the answers, and bound what needs no image.

Sources: the scene world ("world": every (scene, question, language) of its evaluation scenes) and
VQAv2 ("vqa:QUESTIONS_JSON" with `annotations` the annotations JSON and `data_dir` the image root;
only questions with answers are scored).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from bigvl.evaluators import common

log = logging.getLogger("bigvl")
SOURCES = ("world", "vqa")
LANGS = ("en", "zh")


def _langs(entry: Mapping[str, Any]) -> list[str]:
  return [s for s in str(entry.get("langs", "en,zh")).split(",") if s]


def metric_name(kind: str) -> str:
  """A question type or language as one metric path component ("yes/no" → "yes_no")."""
  return re.sub(r"[^0-9A-Za-z]+", "_", kind).strip("_") or "_"


def read_vocabulary(path: str, where: str) -> list[str]:
  """The answers of `path`, one per line (line k is logit column k - 1); a blank or repeated line
  is an error naming it."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{where}: no such file {path}")
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  while lines and not lines[-1].strip():
    lines.pop()
  seen: dict[str, int] = {}
  for number, line in enumerate(lines, 1):
    answer = line.strip()
    if not answer:
      raise ValueError(f"{path}:{number}: blank answer (one answer per line, none empty)")
    if answer in seen:
      raise ValueError(f"{path}:{number}: answer {answer!r} is also line {seen[answer]}")
    seen[answer] = number
  if not seen:
    raise ValueError(f"{path}: no answers")
  return list(seen)


def most_frequent(answers: Sequence[Sequence[str]], groups: Sequence[Any]) -> dict[Any, str]:
  """Per group, its most frequent normalised human answer (every human answer counts once; ties:
  the alphabetically first)."""
  from bigvl.evaluators import vqa_metrics
  counts: dict[Any, collections.Counter] = collections.defaultdict(collections.Counter)
  for a, g in zip(answers, groups):
    counts[g].update(vqa_metrics.normalize_answer(x) for x in a)
  return {g: min(c, key=lambda s: (-c[s], s)) for g, c in counts.items()}


def prior_accuracy(answers: Sequence[Sequence[str]], groups: Sequence[Any]) -> np.ndarray:
  """(n,) the accuracy of answering each question with its group's most frequent answer."""
  from bigvl.evaluators import vqa_metrics
  best = most_frequent(answers, groups)
  return np.array([vqa_metrics.soft_accuracy(best[g], a) for a, g in zip(answers, groups)])


def uniform_chance(types: Sequence[str], type_answers: Mapping[str, Sequence[str]]
                   ) -> np.ndarray:
  """(n,) 1 / (the number of answers each question's type can have)."""
  missing = sorted({t for t in types if not type_answers.get(t)})
  if missing:
    raise ValueError(f"question type(s) {missing} have no answers in type_answers "
                     f"({sorted(type_answers)})")
  return np.array([1.0 / len(type_answers[t]) for t in types])


class VQAEvaluator:
  """Scores the argmax answers of "answer_vqa"; with `output`, every prediction as a JSON line:
  {"question_id" (VQAv2) or "index" (world), "question", "answer", "answers", "type"[, "lang"]}."""

  requires = ("answer_vqa",)

  @classmethod
  def config_keys(cls) -> dict[str, Any]:
    return dict(answers="",       # the system's answer vocabulary, one a line ("": the world's)
                annotations="",   # VQAv2 annotations JSON of a vqa: source
                langs="en,zh",    # the world's question languages to ask
                output="")        # a JSON-lines file for the predictions ("": none)

  @classmethod
  def validate_config(cls, name: str, entry: Mapping[str, Any]) -> None:
    from bigvl.evaluators import kinds
    bad = [s for s in _langs(entry) if s not in LANGS]
    if bad or not _langs(entry):
      raise ValueError(f"evals.{name}.langs={entry.get('langs')!r}: use some of {list(LANGS)}")
    where_kind, _ = kinds.parse_source(entry.get("source", "world"))
    if where_kind not in SOURCES:
      raise ValueError(f"evals.{name}.source={entry.get('source')!r}: vqa reads 'world' or "
                       "'vqa:QUESTIONS_JSON'")
    if where_kind == "vqa" and not entry.get("annotations", ""):
      raise ValueError(f"evals.{name}.annotations: a vqa: source needs its annotations JSON "
                       "(questions without answers cannot be scored)")
    if where_kind == "world" and entry.get("annotations", ""):
      raise ValueError(f"evals.{name}.annotations={entry.get('annotations')!r}: only for a vqa: "
                       "source")

  @classmethod
  def from_config(cls, name: str, entry: Mapping[str, Any], *, tokenizer, image_size: int,
                  world_dir: str = "") -> "VQAEvaluator":
    from bigvl.evaluators import kinds, public_formats, sources
    cls.validate_config(name, entry)
    where_kind, where = kinds.parse_source(entry.get("source", "world"))
    limit = entry.get("max_examples", 0)
    vocab_file = entry.get("answers", "")
    common_args = dict(tokenizer=tokenizer, prefix=name, every=entry.get("every", 0),
                       batch_size=entry.get("batch_size"), output=entry.get("output", ""))
    if where_kind == "world":
      if not world_dir:
        raise ValueError(f"evals.{name}: source 'world' needs the scene world")
      meta = sources.scenes_meta(world_dir)
      data, metas = sources.scenes(world_dir, sources.split_or(entry, "eval"), image_size,
                                   limit)
      image_index, questions, answers, types, langs = [], [], [], [], []
      for i, m in enumerate(metas):
        for q in m["questions"]:
          for lang in _langs(entry):
            image_index.append(i)
            questions.append(q[lang])
            answers.append([q["answer"]])
            types.append(q["type"])
            langs.append(lang)
      if not questions:
        raise ValueError(f"evals.{name}: the scene world's split has no questions")
      vocab = (read_vocabulary(vocab_file, f"evals.{name}.answers") if vocab_file
               else list(meta["answers"]))
      return cls(images=data.images, image_index=np.array(image_index), questions=questions,
                 answers=answers, types=types, langs=langs, vocabulary=vocab,
                 chance=uniform_chance(types, meta["type_answers"]), **common_args)
    if where_kind != "vqa":
      raise ValueError(f"evals.{name}.source={entry.get('source')!r}: vqa reads 'world' or "
                       "'vqa:QUESTIONS_JSON'")
    if not vocab_file:
      raise ValueError(f"evals.{name}.answers: a vqa: source needs the system's answer "
                       "vocabulary file")
    vocab = read_vocabulary(vocab_file, f"evals.{name}.answers")
    try:
      rows = public_formats.vqa_v2(where, entry["annotations"], entry.get("data_dir", ""))
    except ValueError as e:
      raise type(e)(f"evals.{name}: {e}") from None
    scored = [r for r in rows if r["answers"]]
    if not scored:
      raise ValueError(f"evals.{name}: no question of {where} has answers in "
                       f"{entry['annotations']}")
    if len(scored) < len(rows):
      log.info("evals.%s: %d of %d questions have no answers and are not scored", name,
               len(rows) - len(scored), len(rows))
    if limit:
      scored = scored[:limit]
    paths = list(dict.fromkeys(r["image"] for r in scored))
    column = {p: i for i, p in enumerate(paths)}
    answers = [r["answers"] for r in scored]
    types = [r["answer_type"] for r in scored]
    fine = [r["question_type"] or r["answer_type"] or "" for r in scored]
    return cls(images=sources.image_files(paths, image_size, f"evals.{name} ({where})"),
               image_index=np.array([column[r["image"]] for r in scored]),
               questions=[r["question"] for r in scored], answers=answers, types=types,
               vocabulary=vocab, chance=prior_accuracy(answers, fine),
               ids=[r["question_id"] for r in scored], **common_args)

  def __init__(self, *, images: common.Rows, image_index: np.ndarray, questions: Sequence[str],
               answers: Sequence[Sequence[str]], types: Sequence[str | None],
               vocabulary: Sequence[str], chance: np.ndarray, tokenizer,
               langs: Sequence[str] | None = None, ids: Sequence[int] | None = None,
               prefix: str = "vqa", every: int = 0, batch_size: int | None = None,
               output: str = ""):
    n = len(questions)
    self.image_index = np.asarray(image_index, np.int64)
    for what, got in (("image_index", self.image_index), ("answers", answers), ("types", types),
                      ("chance", chance), ("langs", langs), ("ids", ids)):
      if got is not None and len(got) != n:
        raise ValueError(f"{prefix}: {len(got)} {what} for {n} questions")
    if not n:
      raise ValueError(f"{prefix}: no questions")
    if self.image_index.min() < 0 or self.image_index.max() >= len(images):
      raise ValueError(f"{prefix}: image_index outside the {len(images)} images")
    empty = next((i for i, a in enumerate(answers) if not a), None)
    if empty is not None:
      raise ValueError(f"{prefix}: question {empty} ({questions[empty]!r:.60}) has no answers")
    self.images, self.questions = images, list(questions)
    self.answers, self.types = [list(a) for a in answers], list(types)
    self.langs, self.ids = (list(langs) if langs is not None else None), ids
    self.vocabulary, self.chance = list(vocabulary), np.asarray(chance, np.float64)
    self.prior = prior_accuracy(self.answers, self.types)
    self.text, self.text_mask = common.as_written(tokenizer).encode_batch(self.questions)
    self.prefix, self.every, self.batch_size, self.output = prefix, every, batch_size, output

  def rows(self) -> common.Rows:
    """One row per question: its picture (each picture decoded once per batch) and its tokens."""
    def load(idx: np.ndarray) -> dict[str, np.ndarray]:
      pics, inverse = np.unique(self.image_index[idx], return_inverse=True)
      return {"image": self.images.load(pics)["image"][inverse.reshape(-1)],
              "text": self.text[idx], "text_mask": self.text_mask[idx]}
    return common.Rows(len(self.questions), load)

  def predict(self, predictor: common.Predictor) -> list[str]:
    """The predicted answer of every question."""
    logits = np.asarray(predictor.run("answer_vqa", self.rows(), self.batch_size)["logits"])
    if logits.shape != (len(self.questions), len(self.vocabulary)):
      raise ValueError(f"{self.prefix}: answer_vqa gives logits {logits.shape} for "
                       f"{len(self.questions)} questions and an answer vocabulary of "
                       f"{len(self.vocabulary)} (set evals.{self.prefix}.answers to the system's)")
    return [self.vocabulary[k] for k in logits.argmax(-1)]

  def run(self, predictor: common.Predictor) -> dict[str, float]:
    from bigvl.evaluators import vqa_metrics
    p = self.prefix
    predicted = self.predict(predictor)
    acc = np.array([vqa_metrics.soft_accuracy(a, h) for a, h in zip(predicted, self.answers)])
    out = {f"{p}/acc": float(acc.mean()), f"{p}/chance": float(self.chance.mean()),
           f"{p}/prior": float(self.prior.mean())}
    for values in (self.langs, self.types):
      for v in sorted({v for v in values or () if v}):
        keep = np.array([x == v for x in values])
        out[f"{p}/{metric_name(v)}/acc"] = float(acc[keep].mean())
    if self.output:
      self._write(predicted)
    return out

  def _write(self, predicted: Sequence[str]) -> None:
    import jax
    if jax.process_index() != 0:
      return
    os.makedirs(os.path.dirname(os.path.abspath(self.output)), exist_ok=True)
    with open(self.output, "w", encoding="utf-8") as f:
      for i, (q, a) in enumerate(zip(self.questions, predicted)):
        row = ({"question_id": int(self.ids[i])} if self.ids is not None else {"index": i})
        row |= {"question": q, "answer": a, "answers": self.answers[i], "type": self.types[i]}
        if self.langs is not None:
          row["lang"] = self.langs[i]
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
