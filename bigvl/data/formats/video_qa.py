"""Video question answering on video records: multiple choice (pick the right answer among K) and
open-ended (an answer vocabulary), training stream and the items evaluators read.

A record's questions are `meta["qa"]` (the video world's): items of format "choice"
({"question": {lang: str}, "choices": {lang: [str]}, "answer": index}) each followed by the same
question as format "open" ({"answer": {lang: str}}). `items(rec)` pairs them. A multiple-choice
input is the question and one answer as one text ("what does the circle do? moves left"; Chinese
without the space), encoded by the cross-modal encoder with the video; the K scores are a softmax.
An open question is the question alone; its answer is a class of the answer vocabulary
(`world_answers`: every answer of the world's closed-set question types in both languages, from
videos.json; "order" questions, whose answers are sentences, have no open class: -1, not scored).

Training batches (one question per record and pass, drawn from the stream's per-position `draw`,
in a language drawn the same way):
  frames uint8 (T, S, S, 3), frame_mask int32 (T,)
  choice_text, choice_mask  int32 (K, L)   question + choice k (rows past the item's choices: pad)
  choice_valid int32 (K,), choice_answer int32 ()
  text, text_mask  int32 (L,)              the question alone
  open_answer int32 ()                      class in the answer vocabulary, -1: none
  id int64
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from bigvl.data import stream
from bigvl.data.formats import records, video_text
from bigvl.tokenizers import glm

BAD_RECORD, BAD_FRAME, NO_QUESTION = stream.BAD_RECORD, "bad_frame", "no_question"
REASONS = (BAD_RECORD, BAD_FRAME, NO_QUESTION)
KEYS = ("frames", "frame_mask", "choice_text", "choice_mask", "choice_valid", "choice_answer",
        "text", "text_mask", "open_answer", "id")
LANGS = ("en", "zh")


@dataclasses.dataclass(frozen=True)
class Item:
  type: str
  question: Mapping[str, str]             # lang → question
  choices: Mapping[str, Sequence[str]]    # lang → choices ({} for an open-only item)
  answer: int                             # index into choices (-1: open-only)
  open_answer: Mapping[str, str]          # lang → answer ({} for a choice-only item)


def items(rec: Mapping[str, Any]) -> list[Item]:
  """The record's questions, each choice item with its open twin."""
  meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
  qa = meta.get("qa") or []
  out: list[Item] = []
  opens = {json.dumps(q.get("question"), sort_keys=True, ensure_ascii=False): q
           for q in qa if isinstance(q, dict) and q.get("format") == "open"}
  for q in qa:
    if not isinstance(q, dict) or q.get("format") != "choice":
      continue
    twin = opens.get(json.dumps(q.get("question"), sort_keys=True, ensure_ascii=False), {})
    out.append(Item(type=str(q.get("type", "")), question=q["question"], choices=q["choices"],
                    answer=int(q["answer"]), open_answer=twin.get("answer") or {}))
  return out


def join(question: str, answer: str, lang: str) -> str:
  return f"{question}{answer}" if lang == "zh" else f"{question} {answer}"


def world_answers(world_dir: str) -> list[str]:
  """The open answer vocabulary of the video world (videos.json's qa_answers, both languages, in
  a fixed order, without duplicates)."""
  path = os.path.join(world_dir, "videos.json")
  with open(path, encoding="utf-8") as f:
    answers = json.load(f)["qa_answers"]
  out: list[str] = []
  for kind in sorted(answers):
    if not isinstance(answers[kind], dict):
      continue   # "order": sentences, no classes
    for lang in LANGS:
      for a in answers[kind].get(lang, []):
        if a not in out:
          out.append(a)
  return out


def encode_choices(tokenizer: glm.GLMTokenizer, question: str, choices: Sequence[str], lang: str,
                   k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(ids (K, L), mask (K, L), valid (K,)) of question + each choice; more than K choices is an
  error naming the question."""
  if len(choices) > k:
    raise ValueError(f"{len(choices)} choices > qa_choices={k} for {question!r}")
  ids = np.full((k, tokenizer.max_len), tokenizer.pad_id, np.int32)
  mask = np.zeros((k, tokenizer.max_len), np.int32)
  valid = np.zeros((k,), np.int32)
  for i, choice in enumerate(choices):
    ids[i], mask[i] = tokenizer.encode(join(question, choice, lang))
    valid[i] = 1
  return ids, mask, valid


def _parse(raw: bytes, *, tokenizer: glm.GLMTokenizer, num_frames: int, frame_size: int,
           answers: Mapping[str, int], num_choices: int, draw: int | None = None
           ) -> dict[str, Any]:
  try:
    rec = records.decode_record(raw)
    if not records.is_video(rec):
      raise records.RecordError("not a video record (no list of frames)")
    qs = items(rec)
  except (records.RecordError, TypeError, ValueError, KeyError) as e:
    raise stream.RecordFailure(BAD_RECORD, e) from e
  if not qs:
    raise stream.RecordFailure(NO_QUESTION, ValueError(f"record {rec.get('id')} has no question"))
  rng = np.random.default_rng(draw or 0)
  item = qs[int(rng.integers(len(qs)))]
  langs = [lg for lg in LANGS if lg in item.question and lg in item.choices]
  lang = langs[int(rng.integers(len(langs)))]
  try:
    frames, mask = video_text.decode_frames(rec["frames"], num_frames, frame_size,
                                            draft=draw is not None)
  except Exception as e:  # PIL raises many types
    raise stream.RecordFailure(BAD_FRAME, e) from e
  ids, cmask, valid = encode_choices(tokenizer, item.question[lang], item.choices[lang], lang,
                                     num_choices)
  text, text_mask = tokenizer.encode(item.question[lang])
  return {"frames": frames, "frame_mask": mask, "choice_text": ids, "choice_mask": cmask,
          "choice_valid": valid, "choice_answer": np.int32(item.answer), "text": text,
          "text_mask": text_mask,
          "open_answer": np.int32(answers.get(item.open_answer.get(lang, ""), -1)),
          "id": np.int64(rec["id"])}


def _collate(examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in KEYS}


def train_dataset(files: Sequence[str], *, tokenizer: glm.GLMTokenizer, num_frames: int,
                  frame_size: int, batch_size: int, seed: int, answers: Sequence[str],
                  num_choices: int, block: int = 0, blocks: int = 1, worker_count: int = 0,
                  max_skip_fraction: float = 0.05) -> grain.IterDataset:
  parse = functools.partial(_parse, tokenizer=tokenizer, num_frames=num_frames,
                            frame_size=frame_size, answers={a: i for i, a in enumerate(answers)},
                            num_choices=num_choices)
  return stream.train_stream(files, parse=parse, collate=_collate, reasons=REASONS,
                             batch_size=batch_size, seed=seed, block=block, blocks=blocks,
                             worker_count=worker_count, max_skip_fraction=max_skip_fraction)
