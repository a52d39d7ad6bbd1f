"""Video–caption records (`bigvl.data.formats.records`: id, frames, frame_times, caption) on the
stream: contrastive text–video training.

Each pass over a record draws (from the stream's per-position `draw`) one of its captions
(`meta["captions"]` when present, else `caption`) and, when `drop_words` > 0, which low-weight
words of it to drop (DMAE's training augmentation, `bigvl.data.keywords.token_weights`). A record
with more frames than `num_frames` is subsampled uniformly (the centre frame of each of
`num_frames` equal segments); one with fewer is padded with `frame_mask` 0, or skipped
(`TOO_SHORT`) below `min_frames`.

  frames       uint8 (T, S, S, 3)  (the model normalises on the device)
  frame_mask   int32 (T,)
  text, text_mask  int32 (L,)
  text_weight  float32 (L,)  the textual cue's token weights (keywords 2, others 1, special tokens
               0; normalised to sum 1) — uniform over the words without a tagger
  lang         int32 (1 Chinese, 0 English), id int64
  significant  int32 (L,)  with `significant` (SNP-S3): 1 on the pieces of significant words
               (`bigvl.data.significant`)
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import grain
import numpy as np

from bigvl.data import image_ops, keywords, stream, video_decode
from bigvl.data.formats import records
from bigvl.data.formats.image_text import caption_lang
from bigvl.tokenizers import glm

BAD_RECORD, BAD_FRAME, BAD_CAPTION, TOO_SHORT = (stream.BAD_RECORD, "bad_frame", "bad_caption",
                                                 "too_short")
REASONS = (BAD_RECORD, BAD_FRAME, BAD_CAPTION, TOO_SHORT)
KEYS = ("frames", "frame_mask", "text", "text_mask", "text_weight", "lang", "id", "significant")


def captions_of(rec: dict[str, Any]) -> list[str]:
  meta = rec.get("meta")
  options = meta.get("captions") if isinstance(meta, dict) else None
  if isinstance(options, list):
    options = [c for c in options if isinstance(c, str) and c.strip()]
    if options:
      return options
  return [rec["caption"]] if isinstance(rec.get("caption"), str) else []


def decode_frames(frames: Sequence[bytes], num_frames: int, frame_size: int, *,
                  draft: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Encoded frames → (uint8 (T, S, S, 3), int32 (T,) mask); raises on an undecodable frame."""
  keep = video_decode.uniform_indices(len(frames), num_frames)
  out = np.zeros((num_frames, frame_size, frame_size, 3), np.uint8)
  mask = np.zeros((num_frames,), np.int32)
  for slot, k in enumerate(keep):
    if not isinstance(frames[k], bytes):
      raise TypeError(f"frame {k} is {type(frames[k]).__name__}")
    out[slot] = image_ops.decode_image(frames[k], frame_size, draft=draft)
    mask[slot] = 1
  return out, mask


def text_weights(tokenizer: glm.GLMTokenizer, text: str, tagger, *, drop: int = 0,
                 rng: np.random.Generator | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(ids, mask, token weights) of a caption: the tagger's keyword weights, or without one the
  same weight for every token between [CLS] and EOS."""
  if tagger is not None:
    return keywords.token_weights(tokenizer, text, tagger, drop=drop, rng=rng)
  ids, mask = tokenizer.encode(text)
  weight = mask.astype(np.float32)
  n = int(mask.sum())
  weight[0] = 0.0
  weight[n - 1] = 0.0
  total = weight.sum()
  return ids, mask, (weight / total if total > 0 else mask / max(n, 1)).astype(np.float32)


def _parse(raw: bytes, *, tokenizer: glm.GLMTokenizer, num_frames: int, frame_size: int,
           min_frames: int, drop_words: int, tagger, significant=None,
           draw: int | None = None) -> dict[str, Any]:
  try:
    rec = records.decode_record(raw)
    example_id = int(rec["id"])
    if not records.is_video(rec) or not isinstance(rec["frames"], list):
      raise records.RecordError("not a video record (no list of frames)")
  except (records.RecordError, TypeError, ValueError) as e:
    raise stream.RecordFailure(BAD_RECORD, e) from e
  options = captions_of(rec)
  if not options:
    raise stream.RecordFailure(BAD_CAPTION, ValueError(f"caption is {rec.get('caption')!r}"))
  rng = np.random.default_rng(draw or 0)
  caption = options[int(rng.integers(len(options)))] if draw is not None else options[0]
  if len(rec["frames"]) < min_frames:
    raise stream.RecordFailure(TOO_SHORT, ValueError(
        f"{len(rec['frames'])} frames < min_frames={min_frames}"))
  try:
    frames, mask = decode_frames(rec["frames"], num_frames, frame_size, draft=draw is not None)
  except Exception as e:  # PIL raises many types
    raise stream.RecordFailure(BAD_FRAME, e) from e
  text, text_mask, weight = text_weights(tokenizer, caption, tagger,
                                         drop=drop_words if draw is not None else 0, rng=rng)
  out = {"frames": frames, "frame_mask": mask, "text": text, "text_mask": text_mask,
         "text_weight": weight.astype(np.float32), "lang": np.int32(caption_lang(caption)),
         "id": np.int64(example_id)}
  if significant is not None:
    sig_ids, _, flags = significant.token_flags(tokenizer, caption)
    if not np.array_equal(sig_ids, text):
      raise AssertionError(f"significant words: pieces disagree for {caption!r}")
    out["significant"] = flags
  return out


def _collate(examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0] if k in KEYS}


def train_dataset(files: Sequence[str] | Any, *, tokenizer: glm.GLMTokenizer, num_frames: int,
                  frame_size: int, batch_size: int, seed: int, min_frames: int = 1,
                  drop_words: int = 0, tagger=None, significant=None, block: int = 0,
                  blocks: int = 1,
                  worker_count: int = 0, max_skip_fraction: float = 0.05,
                  max_open_shards: int = stream.shards.DEFAULT_MAX_OPEN) -> grain.IterDataset:
  """The training stream of video–caption batches (`stream.train_stream`); `tagger` is a
  `bigvl.data.keywords` tagger (None: every word weighs the same); `significant` a
  `bigvl.data.significant.SignificantWords` (adds "significant")."""
  parse = functools.partial(_parse, tokenizer=tokenizer, num_frames=num_frames,
                            frame_size=frame_size, min_frames=min_frames, drop_words=drop_words,
                            tagger=tagger, significant=significant)
  return stream.train_stream(files, parse=parse, collate=_collate, reasons=REASONS,
                             batch_size=batch_size, seed=seed, block=block, blocks=blocks,
                             worker_count=worker_count, max_skip_fraction=max_skip_fraction,
                             max_open_shards=max_open_shards)
