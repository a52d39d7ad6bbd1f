"""Video question answering: multiple choice (the right answer among K) and open-ended (an answer
vocabulary), with the chance level beside each.

Sources (`source`):
  world                     the video world's split (`split`, default "eval": held-out
                            compositions): every multiple-choice question of every clip, in each
                            language (`langs`), and its open twin where its answer is a class of
                            the vocabulary ("order" questions, whose answers are sentences, have
                            none and are not in the open metric)
  msrvtt_qa:JSON            MSRVTT-QA style: a list of {"video_id", "question", "answer"}
                            (video_id an int 7010 or a name "video7010"); open-ended
  msrvtt_mc:JSON            MSRVTT-MC style (JSFusion's): a list of {"video_id" or "clip_name",
                            "options": [5 captions], "answer": index}; multiple choice with no
                            question (each option scored with the video)
Videos of the JSON sources are `video_dir`/{name}.mp4 (default: beside the JSON), decoded as
the other video evaluators do.

Predictors: "qa_choice" ({"frames", "frame_mask", "choice_text", "choice_mask", "choice_valid"}
→ {"scores": (B, K)}) and "qa_open" ({"frames", "frame_mask", "text", "text_mask"} →
{"logits": (B, A)}). Metrics, for `prefix` the entry's name:
  {prefix}/mc/acc, {prefix}/mc/chance      chance: the mean of 1 / (an item's number of choices)
  {prefix}/open/acc, {prefix}/open/chance  chance: the mean of 1 / (answers of the item's type) for
                                           the world, 1 / vocabulary size otherwise; an answer
                                           outside the vocabulary counts as wrong
  {prefix}/mc/{type}/acc, {prefix}/open/{type}/acc   per question type (the world)
  {prefix}/mc/n, {prefix}/open/n           how many were scored
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from bigvl.evaluators import common

SOURCES = ("world", "msrvtt_qa", "msrvtt_mc")


@dataclasses.dataclass
class QASet:
  videos: common.Rows                # {"frames", "frame_mask"}
  mc: list[dict[str, Any]]           # {"video", "question", "choices", "answer", "lang", "type"}
  open: list[dict[str, Any]]         # {"video", "question", "answer", "lang", "type"}
  type_answers: dict[str, int]       # type → how many answers it has (the world's chance)


def parse_source(source: str) -> tuple[str, str]:
  if source == "world":
    return "world", ""
  kind, sep, where = source.partition(":")
  if sep and where and kind in SOURCES[1:]:
    return kind, where
  raise ValueError(f"video_qa source {source!r}: use 'world', 'msrvtt_qa:JSON' or 'msrvtt_mc:JSON'")


def read_answers(answers: str, world_dir: str) -> list[str]:
  """The open vocabulary: a file of one answer per line, or "" for the world's."""
  from bigvl.data.formats import video_qa
  if answers:
    with open(answers, encoding="utf-8") as f:
      out = [line.strip() for line in f if line.strip()]
    if not out:
      raise ValueError(f"answers file {answers!r} holds no answer")
    return out
  if not world_dir:
    raise ValueError("video_qa: set the entry's answers (one per line, as training's qa.answers)")
  return video_qa.world_answers(world_dir)


def world_set(world_dir: str, split: str, num_frames: int, frame_size: int, langs: Sequence[str],
              max_examples: int = 0) -> QASet:
  from bigvl.data.formats import video_qa
  from bigvl.evaluators import video_sources
  files = sorted(glob.glob(os.path.join(world_dir, f"{split}-*.array_record")))
  if not files:
    raise FileNotFoundError(f"no shards for split {split!r} in {world_dir}")
  vs = video_sources.shards(files, num_frames, frame_size, max_examples, where=f"world {split}")
  import grain
  from bigvl.data.formats import records
  source = grain.sources.ArrayRecordDataSource(files)
  mc, opn = [], []
  for v in range(len(vs.videos)):
    rec = records.decode_record(source[v])
    for item in video_qa.items(rec):
      for lang in langs:
        if lang not in item.question:
          continue
        mc.append({"video": v, "question": item.question[lang], "choices": item.choices[lang],
                   "answer": item.answer, "lang": lang, "type": item.type})
        if item.type != "order" and lang in item.open_answer:
          opn.append({"video": v, "question": item.question[lang],
                      "answer": item.open_answer[lang], "lang": lang, "type": item.type})
  with open(os.path.join(world_dir, "videos.json"), encoding="utf-8") as f:
    answers = json.load(f)["qa_answers"]
  type_answers = {k: len(v["en"]) for k, v in answers.items() if isinstance(v, dict)}
  return QASet(vs.videos, mc, opn, type_answers)


def _video_name(row: Mapping[str, Any], where: str, i: int) -> str:
  vid = row.get("video_id", row.get("clip_name", row.get("video")))
  if vid is None:
    raise ValueError(f"{where}: item {i} has no video_id / clip_name")
  return f"video{vid}" if isinstance(vid, int) or str(vid).isdigit() else str(vid)


def json_set(kind: str, path: str, video_dir: str, num_frames: int, frame_size: int,
             max_examples: int = 0) -> QASet:
  """MSRVTT-QA / MSRVTT-MC JSON (see the module docstring); a malformed item raises ValueError
  naming the file and item."""
  from bigvl.data import video_layouts
  from bigvl.evaluators import video_sources
  with open(path, encoding="utf-8") as f:
    rows = json.load(f)
  if not isinstance(rows, list) or not rows:
    raise ValueError(f"{path}: expected a non-empty JSON list of questions")
  if max_examples:
    rows = rows[:max_examples]
  root = video_dir or os.path.dirname(os.path.abspath(path))
  names: dict[str, int] = {}
  mc, opn = [], []
  for i, row in enumerate(rows):
    if not isinstance(row, dict):
      raise ValueError(f"{path}: item {i} is not an object")
    name = _video_name(row, path, i)
    v = names.setdefault(name, len(names))
    if kind == "msrvtt_qa":
      if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
        raise ValueError(f"{path}: item {i} needs a string question and answer")
      opn.append({"video": v, "question": row["question"], "answer": row["answer"].strip(),
                  "lang": "en", "type": "all"})
    else:
      options, answer = row.get("options"), row.get("answer")
      if (not isinstance(options, list) or len(options) < 2
          or not all(isinstance(o, str) for o in options)
          or not isinstance(answer, int) or not 0 <= answer < len(options)):
        raise ValueError(f"{path}: item {i} needs 'options' (a list of >= 2 strings) and an "
                         f"'answer' index into them")
      mc.append({"video": v, "question": "", "choices": options, "answer": answer, "lang": "en",
                 "type": "all"})
  clips = [video_layouts.Clip(order=k + 1, name=n, path=os.path.join(root, f"{n}.mp4"),
                              captions=[n]) for n, k in names.items()]
  vs = video_sources.clip_files(clips, num_frames, frame_size, where=f"{kind}:{path}")
  return QASet(vs.videos, mc, opn, {})


class VideoQAEvaluator:
  requires = ("qa_choice", "qa_open")

  @classmethod
  def config_keys(cls) -> dict[str, Any]:
    return dict(
        num_frames=0,            # frames per video (0: the system's)
        choices=0,               # K, the most choices of an item (0: the system's)
        answers="",              # open vocabulary file ("": the system's / the world's)
        langs="en,zh",           # the world's questions in these languages
        video_dir="",            # JSON sources: the folder of {video}.mp4 ("": beside the JSON)
        formats="",              # "mc", "open" or "mc,open" ("": the system's)
    )

  @classmethod
  def validate_config(cls, name: str, entry: Mapping[str, Any]) -> None:
    parse_source(entry.get("source", "world"))
    if entry.get("num_frames", 0) < 0 or entry.get("choices", 0) < 0:
      raise ValueError(f"evals.{name}: num_frames and choices must be >= 0")
    bad = [lg for lg in str(entry.get("langs", "en,zh")).split(",") if lg not in ("en", "zh")]
    if bad:
      raise ValueError(f"evals.{name}.langs: {bad} not in en, zh")
    formats = [f for f in str(entry.get("formats", "")).split(",") if f]
    if any(f not in ("mc", "open") for f in formats):
      raise ValueError(f"evals.{name}.formats={entry.get('formats')!r}: 'mc', 'open' or 'mc,open'")

  @classmethod
  def from_config(cls, name: str, entry: Mapping[str, Any], *, tokenizer, image_size: int,
                  world_dir: str = "") -> "VideoQAEvaluator":
    if not entry.get("num_frames") or not entry.get("choices"):
      raise ValueError(f"evals.{name}: num_frames and choices must be set (a video QA system "
                       "fills them from its config)")
    kind, where = parse_source(entry.get("source", "world"))
    n, s, limit = entry["num_frames"], image_size, entry.get("max_examples", 0)
    if kind == "world":
      if not world_dir:
        raise ValueError(f"evals.{name}: source 'world' needs the video world")
      data = world_set(world_dir, entry.get("split", "eval"), n, s,
                       str(entry.get("langs", "en,zh")).split(","), limit)
    else:
      data = json_set(kind, os.path.expanduser(where), entry.get("video_dir", ""), n, s, limit)
    formats = [f for f in str(entry.get("formats", "") or "mc,open").split(",") if f]
    if "mc" not in formats:
      data.mc = []
    if "open" not in formats:
      data.open = []
    answers = read_answers(entry.get("answers", ""), world_dir) if data.open else []
    return cls(data=data, answers=answers, tokenizer=tokenizer, choices=entry["choices"],
               prefix=name, every=entry.get("every", 0), batch_size=entry.get("batch_size"))

  def __init__(self, *, data: QASet, answers: Sequence[str], tokenizer, choices: int,
               prefix: str = "video_qa", every: int = 0, batch_size: int | None = None):
    if not data.mc and not data.open:
      raise ValueError("video QA needs at least one question (of the formats asked for)")
    self.data, self.answers = data, list(answers)
    self.images = data.videos
    self.tokenizer, self.choices = tokenizer, choices
    self.prefix, self.every, self.batch_size = prefix, every, batch_size

  def _rows(self, items: list[dict[str, Any]], extra) -> common.Rows:
    videos = self.data.videos

    def load(idx: np.ndarray) -> dict[str, np.ndarray]:
      picked = [items[int(i)] for i in idx]
      out = videos.load(np.asarray([it["video"] for it in picked], np.int64))
      parts = [extra(it) for it in picked]
      for k in parts[0]:
        out[k] = np.stack([p[k] for p in parts])
      return out
    return common.Rows(len(items), load)

  def run_mc(self, predictor: common.Predictor) -> dict[str, float]:
    from bigvl.data.formats import video_qa
    items = self.data.mc
    if not items:
      return {}

    def extra(it):
      ids, mask, valid = video_qa.encode_choices(self.tokenizer, it["question"], it["choices"],
                                                 it["lang"], self.choices)
      return {"choice_text": ids, "choice_mask": mask, "choice_valid": valid}
    scores = predictor.run("qa_choice", self._rows(items, extra), self.batch_size)["scores"]
    hit = np.argmax(scores, axis=1) == np.asarray([it["answer"] for it in items])
    p = self.prefix
    out = {f"{p}/mc/acc": float(hit.mean()),
           f"{p}/mc/chance": float(np.mean([1.0 / len(it["choices"]) for it in items])),
           f"{p}/mc/n": float(len(items))}
    for t in sorted({it["type"] for it in items}) if len({it["type"] for it in items}) > 1 else ():
      sel = np.asarray([it["type"] == t for it in items])
      out[f"{p}/mc/{t}/acc"] = float(hit[sel].mean())
    return out

  def run_open(self, predictor: common.Predictor) -> dict[str, float]:
    items = self.data.open
    if not items or not self.answers:
      return {}

    def extra(it):
      ids, mask = self.tokenizer.encode(it["question"])
      return {"text": ids, "text_mask": mask}
    logits = predictor.run("qa_open", self._rows(items, extra), self.batch_size)["logits"]
    index = {a: i for i, a in enumerate(self.answers)}
    want = np.asarray([index.get(it["answer"], -1) for it in items])
    if logits.shape[1] != len(self.answers):
      raise ValueError(f"{self.prefix}: the model's open head has {logits.shape[1]} answers, the "
                       f"vocabulary {len(self.answers)}: train with the same qa.answers")
    hit = (np.argmax(logits, axis=1) == want) & (want >= 0)
    per_type = self.data.type_answers
    chance = [1.0 / per_type[it["type"]] if it["type"] in per_type else 1.0 / len(self.answers)
              for it in items]
    p = self.prefix
    out = {f"{p}/open/acc": float(hit.mean()), f"{p}/open/chance": float(np.mean(chance)),
           f"{p}/open/n": float(len(items))}
    for t in sorted({it["type"] for it in items}) if len({it["type"] for it in items}) > 1 else ():
      sel = np.asarray([it["type"] == t for it in items])
      out[f"{p}/open/{t}/acc"] = float(hit[sel].mean())
    return out

  def run(self, predictor: common.Predictor) -> dict[str, float]:
    return {**self.run_mc(predictor), **self.run_open(predictor)}
