"""Scene records for fusion models (Switch-BERT): one picture with its objects' boxes, questions
and answers, a referring expression of one object, and a caption with a near miss
(data_pipelines/scene_world.py writes them; records.py is the layout, `meta` holds the rest).

Each pass over a record draws (from the stream's per-position `draw`) one of its questions, the
language of the texts, and whether the image–text matching pair is the true caption or the near
miss; a resumed stream draws the same. Every row carries all three tasks:

  image        uint8 (S, S, 3)
  question     int32 (L,), question_mask, answer int32 (index into `answers`)
  caption      int32 (L,), caption_mask, match float32 (1 true caption, 0 near miss)
  refer        int32 (L,), refer_mask, boxes float32 (K, 4) x0, y0, x1, y1 as fractions of the
               picture, box_valid int32 (K,), target int32, refer_valid float32 (0 for a scene of
               one object: nothing to choose among)

A record that lacks any of it, or whose answer is not in `answers`, is skipped and counted.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import grain
import numpy as np

from bigvl.data import image_ops, stream
from bigvl.data.formats import records
from bigvl.tokenizers import glm

BAD_RECORD, BAD_IMAGE, BAD_META = stream.BAD_RECORD, "bad_image", "bad_meta"
REASONS = (BAD_RECORD, BAD_IMAGE, BAD_META)
LANGS = ("en", "zh")
KEYS = ("image", "question", "question_mask", "answer", "caption", "caption_mask", "match",
        "refer", "refer_mask", "boxes", "box_valid", "target", "refer_valid", "id")


def _parse(raw: bytes, *, tokenizer: glm.GLMTokenizer, image_size: int, answers: dict[str, int],
           max_boxes: int, langs: Sequence[str], draw: int | None = None) -> dict[str, Any]:
  try:
    rec = records.decode_record(raw)
    meta, example_id = rec["meta"], int(rec["id"])
  except (records.RecordError, KeyError, TypeError, ValueError) as e:
    raise stream.RecordFailure(BAD_RECORD, e) from e
  rng = np.random.default_rng(draw or 0)
  try:
    objects, questions = meta["objects"], meta["questions"]
    q = questions[int(rng.integers(len(questions)))]
    lang = langs[int(rng.integers(len(langs)))]
    answer = answers[q["answer"]]
    match = float(rng.random() < 0.5)
    caption = (meta["captions"] if match else meta["near_miss"])[lang]
    refer_text = meta["refer"][lang]
    boxes = np.zeros((max_boxes, 4), np.float32)
    valid = np.zeros(max_boxes, np.int32)
    for k, o in enumerate(objects[:max_boxes]):
      boxes[k] = np.asarray(o["box"], np.float32) / image_size
      valid[k] = 1
    target = int(meta["target"])
    question = q[lang]
  except (KeyError, TypeError, ValueError, IndexError) as e:
    raise stream.RecordFailure(BAD_META, e) from e
  try:
    image = image_ops.decode_image(rec["image"], image_size, draft=True)
  except Exception as e:  # PIL raises many types
    raise stream.RecordFailure(BAD_IMAGE, e) from e
  out = {"image": image, "answer": np.int32(answer), "match": np.float32(match),
         "boxes": boxes, "box_valid": valid, "target": np.int32(min(target, max_boxes - 1)),
         "refer_valid": np.float32(len(objects) > 1 and target < max_boxes),
         "id": np.int64(example_id)}
  for key, text in (("question", question), ("caption", caption), ("refer", refer_text)):
    out[key], out[key + "_mask"] = tokenizer.encode(text)
  return out


def _collate(examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in KEYS}


def train_dataset(files: Sequence[str], *, tokenizer: glm.GLMTokenizer, image_size: int,
                  answers: Sequence[str], batch_size: int, seed: int, max_boxes: int = 4,
                  langs: Sequence[str] = LANGS, block: int = 0, blocks: int = 1,
                  worker_count: int = 0, max_skip_fraction: float = 0.05) -> grain.IterDataset:
  """The training stream of this reader's scene batches (`stream.train_stream`)."""
  parse = functools.partial(_parse, tokenizer=tokenizer, image_size=image_size,
                            answers={a: i for i, a in enumerate(answers)}, max_boxes=max_boxes,
                            langs=tuple(langs))
  return stream.train_stream(list(files), parse=parse, collate=_collate, reasons=REASONS,
                             batch_size=batch_size, seed=seed, block=block, blocks=blocks,
                             worker_count=worker_count, max_skip_fraction=max_skip_fraction)
