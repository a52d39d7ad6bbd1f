"""Builds the stream world (data_pipelines/stream_world.py) as a grounding dataset in the layout
real feature datasets use:

    features/{video}.npy    (T, dim) float16 frame features, one file per stream
    train.json, val.json    ActivityNet Captions' layout: {video: {"duration", "timestamps":
                            [[start, end] seconds], "sentences": [...]}}, plus "sentences_zh"
                            (the same queries in Chinese) and "events" (kind, object, frames)
    tokenizer.model         SentencePiece on the training queries (both languages)
    world.json              dim, fps, noise, frame counts, seed
    manifest.json           the parameters and file digests (a second call with the same ones
                            reuses the build)

    python -m data_pipelines.build_streams --out=DIR [--num_train=2000 --num_val=200]
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines import build_world, shard_writer, stream_world
from bigvl.tokenizers import sp_train

STREAMS_VERSION = 1
FORMAT = "bigvl.stream_world"
TOKENIZER, WORLD = "tokenizer.model", "world.json"
DEFAULT_VOCAB_SIZE = 256
SPLIT_FILES = {"train": "train.json", "val": "val.json"}


def default_dir(dim: int = 64) -> Path:
  """$BIGVL_STREAM_DIR, else ~/.cache/bigvl/stream_world_v{VERSION}_d{dim}."""
  env = os.environ.get("BIGVL_STREAM_DIR")
  if env:
    return Path(env).expanduser()
  return Path.home() / ".cache" / "bigvl" / f"stream_world_v{STREAMS_VERSION}_d{dim}"


def _is_complete(directory: Path, params: dict[str, Any]) -> dict[str, Any] | None:
  manifest = shard_writer.read_manifest(directory)
  if not manifest or manifest.get("format") != FORMAT or manifest.get("params") != params:
    return None
  for name, digest in manifest.get("files", {}).items():
    path = directory / name
    if not path.is_file() or shard_writer.file_sha256(path) != digest:
      return None
  counts = {"train": params["num_train"], "val": params["num_val"]}
  if len(list((directory / "features").glob("*.npy"))) != sum(counts.values()):
    return None
  return manifest


def build(out_dir: str | os.PathLike | None = None, *, seed: int = 0, dim: int = 64,
          fps: float = 2.0, noise: float = 0.2, min_frames: int = 128, max_frames: int = 256,
          num_train: int = 2000, num_val: int = 200,
          vocab_size: int = DEFAULT_VOCAB_SIZE) -> dict[str, Any]:
  """Builds (or reuses) the stream world in `out_dir` (default_dir(dim)); returns its manifest.

  Raises FileExistsError when `out_dir` holds something that is not a stream-world build (it is
  never deleted)."""
  out_dir = Path(out_dir) if out_dir is not None else default_dir(dim)
  params = {"version": STREAMS_VERSION, "seed": seed, "dim": dim, "fps": fps, "noise": noise,
            "min_frames": min_frames, "max_frames": max_frames, "num_train": num_train,
            "num_val": num_val, "vocab_size": vocab_size}
  manifest = _is_complete(out_dir, params)
  if manifest is not None:
    logging.info("Reusing the stream world in %s", out_dir)
    return manifest
  if out_dir.exists():
    old = shard_writer.read_manifest(out_dir)
    if not out_dir.is_dir() or ((old is None or old.get("format") != FORMAT)
                                and any(out_dir.iterdir())):
      raise FileExistsError(f"{out_dir} exists and is not a stream-world build; refusing to "
                            "replace it")
  t0 = time.monotonic()
  book = stream_world.codebook(seed, dim)
  with shard_writer.staging_dir(out_dir) as staged:
    (staged / "features").mkdir()
    for split, count in (("train", num_train), ("val", num_val)):
      anns = {}
      for i in range(count):
        vid, feats, ann = stream_world.make_stream(seed, split, i, dim=dim, fps=fps, noise=noise,
                                                   min_frames=min_frames,
                                                   max_frames=max_frames, book=book)
        np.save(staged / "features" / f"{vid}.npy", feats.astype(np.float16))
        anns[vid] = ann
      shard_writer.write_json(staged / SPLIT_FILES[split], anns)
    sentences = stream_world.corpus(seed, min(num_train, 1000))
    sp_train.train_sentencepiece(build_world._isolate_cjk(sentences), str(staged / TOKENIZER),
                                 vocab_size)
    shard_writer.write_json(staged / WORLD, params)
    names = [TOKENIZER, WORLD, *SPLIT_FILES.values()]
    manifest = {"format": FORMAT, "params": params,
                "files": {n: shard_writer.file_sha256(staged / n) for n in names}}
    shard_writer.write_json(staged / shard_writer.MANIFEST, manifest)
    manifest = shard_writer.publish_or_reuse(staged, out_dir,
                                             lambda: _is_complete(out_dir, params))
  logging.info("Built the stream world in %s in %.1f s", out_dir, time.monotonic() - t0)
  return manifest


def main(argv=None) -> None:
  import argparse
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dim", type=int, default=64)
  p.add_argument("--num_train", type=int, default=2000)
  p.add_argument("--num_val", type=int, default=200)
  a = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  m = build(a.out, seed=a.seed, dim=a.dim, num_train=a.num_train, num_val=a.num_val)
  print(json.dumps({"out": str(a.out or default_dir(a.dim)), "params": m["params"]}))


if __name__ == "__main__":
  main()
