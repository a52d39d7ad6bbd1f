"""Builds the video world (data_pipelines/video_world.py): its shards, description and tokenizer.

  <dir>/   (default_dir: $BIGVL_VIDEO_DIR, else ~/.cache/bigvl/video_world_v{V}_{size}x{frames})
    train-0000i-of-0000n.array_record       seen compositions only
    eval-00000-of-00001.array_record        a held-out composition in every clip, mirrored pairs
    eval_seen-00000-of-00001.array_record   new clips of seen compositions, mirrored pairs
    videos.json       event kinds, held-out compositions, answers, templates, params
    tokenizer.model   SentencePiece model trained on video_world.corpus() (both languages)
    manifest.json     written last (the directory is staged and renamed)

A model trained from nothing on this world reads its texts with this tokenizer. A second call with
the same parameters reuses the directory.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

from bigvl.data.formats.records import encode_record
from bigvl.tokenizers import sp_train
from data_pipelines import build_world, parallel, shard_writer, video_world

VIDEOS_VERSION = 1
FORMAT = "bigvl.video_world"
META = "videos.json"
TOKENIZER = "tokenizer.model"
# The corpus admits at most ~470 BPE pieces (Chinese is split into characters); 384 keeps every
# English word whole.
DEFAULT_VOCAB_SIZE = 384
DEFAULT_CORPUS_CLIPS = 3000


def default_dir(frame_size: int = 32, num_frames: int = 8) -> Path:
  """$BIGVL_VIDEO_DIR, else ~/.cache/bigvl/video_world_v{VIDEOS_VERSION}_{size}x{frames}."""
  env = os.environ.get("BIGVL_VIDEO_DIR")
  if env:
    return Path(env).expanduser()
  return (Path.home() / ".cache" / "bigvl"
          / f"video_world_v{VIDEOS_VERSION}_{frame_size}x{num_frames}")


def _write_shard_task(task: tuple) -> dict[str, Any]:
  directory, split, shard, num_shards, start, stop, seed, frame_size, num_frames, fps = task

  def records() -> Iterator[bytes]:
    for index in range(start, stop):
      yield encode_record(video_world.make_clip(seed, split, index, frame_size, num_frames, fps))

  path = Path(directory) / shard_writer.shard_filename(split, shard, num_shards)
  return {"split": split, "shard": shard, "info": shard_writer.write_shard(path, records())}


def _tokenizer_task(task: tuple) -> dict[str, Any]:
  directory, seed, num_frames, vocab_size, num_clips = task
  sentences = video_world.corpus(seed, num_clips, num_frames)
  sp_train.train_sentencepiece(build_world._isolate_cjk(sentences),
                               str(Path(directory) / TOKENIZER), vocab_size)
  return {"split": None}


def _run(task: tuple) -> dict[str, Any]:
  return _tokenizer_task(task[1:]) if task[0] == "tokenizer" else _write_shard_task(task[1:])


def _is_complete(directory: Path, params: dict[str, Any]) -> dict[str, Any] | None:
  manifest = shard_writer.read_manifest(directory)
  if not manifest or manifest.get("format") != FORMAT or manifest.get("params") != params:
    return None
  if not all((directory / f).is_file() for f in (META, TOKENIZER)):
    return None
  if not all(shard_writer.split_files_intact(directory, e) for e in manifest["splits"].values()):
    return None
  return manifest


def build(out_dir: str | os.PathLike | None = None, *, seed: int = 0, frame_size: int = 32,
          num_frames: int = 8, fps: float = 4, num_train: int = 8000, num_eval: int = 1000,
          num_shards: int = 4, vocab_size: int = DEFAULT_VOCAB_SIZE,
          num_corpus_clips: int = DEFAULT_CORPUS_CLIPS,
          num_workers: int | None = None) -> dict[str, Any]:
  """Builds (or reuses) the video world in `out_dir`; returns its manifest.

  Args:
    out_dir: target directory; default_dir(frame_size, num_frames) when None.
    seed: world seed; records are a function of (seed, split, index) only.
    frame_size: square frame side in pixels.
    num_frames, fps: frames per clip; frame k is at time k / fps.
    num_train: clips in the train split (seen compositions only).
    num_eval: clips in each of eval and eval_seen (even: they are mirrored pairs).
    num_shards: train shards (each eval split is one shard).
    vocab_size: SentencePiece vocabulary size, specials included.
    num_corpus_clips: clips whose captions and questions train the tokenizer.
    num_workers: generator processes; default one per available core. The output does not
      depend on it.

  Raises:
    ValueError: an odd num_eval, or num_frames below video_world.MIN_FRAMES.
    FileExistsError: `out_dir` exists and holds something that is not a video-world build (it is
      never deleted).
  """
  if num_eval % 2:
    raise ValueError(f"num_eval={num_eval}: evaluation clips come in mirrored pairs, so it must "
                     "be even")
  if num_frames < video_world.MIN_FRAMES:
    raise ValueError(f"num_frames={num_frames}: a clip needs at least {video_world.MIN_FRAMES}")
  out_dir = Path(out_dir) if out_dir is not None else default_dir(frame_size, num_frames)
  params = {"version": VIDEOS_VERSION, "seed": seed, "frame_size": frame_size,
            "num_frames": num_frames, "fps": fps, "num_train": num_train, "num_eval": num_eval,
            "num_shards": num_shards, "vocab_size": vocab_size,
            "num_corpus_clips": num_corpus_clips}
  manifest = _is_complete(out_dir, params)
  if manifest is not None:
    logging.info("Reusing the video world in %s", out_dir)
    return manifest
  if out_dir.exists():
    old = shard_writer.read_manifest(out_dir)
    if not out_dir.is_dir() or ((old is None or old.get("format") != FORMAT)
                                and any(out_dir.iterdir())):
      raise FileExistsError(f"{out_dir} exists and is not a video-world build; refusing to "
                            "replace it")
  t0 = time.monotonic()
  sizes = {"train": (num_train, num_shards), "eval": (num_eval, 1), "eval_seen": (num_eval, 1)}
  with shard_writer.staging_dir(out_dir) as staged:
    tasks = [("shard", str(staged), split, k, n, start, stop, seed, frame_size, num_frames, fps)
             for split, (count, n) in sizes.items()
             for k, (start, stop) in enumerate(shard_writer.shard_ranges(count, n))]
    tasks.sort(key=lambda t: t[6] - t[5], reverse=True)   # longest first balances workers
    # The tokenizer trains in a worker beside the shards (about as long as 250 clips).
    tasks.insert(min(1, len(tasks)), ("tokenizer", str(staged), seed, num_frames, vocab_size,
                                      num_corpus_clips))
    workers = parallel.default_num_workers() if num_workers is None else num_workers
    results = list(parallel.imap(_run, tasks, min(workers, len(tasks))))
    splits = {}
    for split in sizes:
      infos = sorted((r for r in results if r["split"] == split), key=lambda r: r["shard"])
      splits[split] = shard_writer.split_entry([r["info"] for r in infos])
    shard_writer.write_json(staged / META, video_world.describe() | {"params": params})
    manifest = {"format": FORMAT, "params": params, "splits": splits,
                "digest": shard_writer.combine_digests(splits[s]["digest"] for s in sizes),
                "files": {name: shard_writer.file_sha256(staged / name)
                          for name in (META, TOKENIZER)}}
    shard_writer.write_json(staged / shard_writer.MANIFEST, manifest)
    manifest = shard_writer.publish_or_reuse(staged, out_dir,
                                             lambda: _is_complete(out_dir, params))
  logging.info("Built the video world in %s in %.1f s", out_dir, time.monotonic() - t0)
  return manifest
