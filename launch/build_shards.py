"""Builds ArrayRecord shards: from a JSONL of (image, caption) pairs, or the synthetic world.

Real data:
  python launch/build_shards.py --input=pairs.jsonl --output_dir=DIR \
      [--num_shards=N] [--split=train] [--image_size=S] [--seed=0]
prints one JSON line {"written", "skipped", "skipped_by_reason",
"skipped_examples", ...} and exits non-zero if nothing could be written, or if
more than --max_skip_fraction of the lines were bad (then nothing is written and
the error names the commonest reason).

A manifest for shards made elsewhere (or before bigvl wrote one), so that training indexes them
without opening each shard:
  python launch/build_shards.py --write_manifest=DIR

The embedded default dataset (shards, world.json, tokenizer.model):
  python launch/build_shards.py --synthetic_world [--output_dir=DIR] [--image_size=48]
prints its manifest's summary as one JSON line.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

from data_pipelines import build_world, jsonl_to_shards  # noqa: E402

_INPUT = flags.DEFINE_string("input", None, "JSONL file: one {image, caption(s)} object per line.")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Where shards go (for --synthetic_world: default_dir() when unset).")
_NUM_SHARDS = flags.DEFINE_integer(
    "num_shards", None, "Shards for the split (default 1; 8 train shards for the world).")
_SPLIT = flags.DEFINE_string("split", "train", "Split name used in shard file names.")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", None,
    "JSONL: downscale so the shorter side is at most this and re-encode (unset: keep bytes). "
    "World: the image side (default 48).")
_SEED = flags.DEFINE_integer(
    "seed", 0, "JSONL: shuffles records across shards (-1 keeps file order). World: its seed.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", None, "Processes (default: one per core).")
_FORCE = flags.DEFINE_bool("force", False, "JSONL: rebuild even if an identical build exists.")
_MAX_SKIP_FRACTION = flags.DEFINE_float(
    "max_skip_fraction", 0.05,
    "JSONL: fail, writing nothing, when more than this share of the lines is bad (as training's "
    "data.max_skip_fraction); 1 never fails.")
_SYNTHETIC_WORLD = flags.DEFINE_bool(
    "synthetic_world", False, "Build the embedded synthetic-world dataset instead of --input.")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 60000, "World: train records.")
_NUM_EVAL = flags.DEFINE_integer("num_eval", 1200, "World: records per eval split.")
_WRITE_MANIFEST = flags.DEFINE_string(
    "write_manifest", None, "Write manifest.json for the *.array_record shards already in this "
    "directory (counts, bytes, digest of each) instead of building shards.")


def _write_manifest() -> int:
  from data_pipelines import parallel, shard_writer
  start = time.monotonic()
  manifest = shard_writer.write_manifest(
      _WRITE_MANIFEST.value, num_workers=_NUM_WORKERS.value or parallel.default_num_workers())
  print(json.dumps({
      "manifest": os.path.join(_WRITE_MANIFEST.value, shard_writer.MANIFEST),
      "splits": {k: {"shards": len(v["shards"]), "records": v["num_records"]}
                 for k, v in manifest["splits"].items()},
      "seconds": round(time.monotonic() - start, 2)}))
  return 0


def _world() -> int:
  start = time.monotonic()
  image_size = _IMAGE_SIZE.value or 48
  out_dir = _OUTPUT_DIR.value or str(build_world.default_dir(image_size))
  manifest = build_world.build(
      out_dir, seed=_SEED.value, image_size=image_size, num_train=_NUM_TRAIN.value,
      num_eval=_NUM_EVAL.value, num_shards=_NUM_SHARDS.value or 8,
      num_workers=_NUM_WORKERS.value)
  print(json.dumps({
      "output_dir": out_dir,
      "splits": {k: v["num_records"] for k, v in manifest["splits"].items()},
      "digest": manifest["digest"],
      "seconds": round(time.monotonic() - start, 2),
  }))
  return 0


def _jsonl() -> int:
  if not _INPUT.value or not _OUTPUT_DIR.value:
    raise app.UsageError("--input and --output_dir are required (or pass --synthetic_world)")
  try:
    summary = jsonl_to_shards.convert(
        _INPUT.value, _OUTPUT_DIR.value, split=_SPLIT.value, num_shards=_NUM_SHARDS.value or 1,
        image_size=_IMAGE_SIZE.value, seed=_SEED.value, num_workers=_NUM_WORKERS.value,
        force=_FORCE.value, max_skip_fraction=_MAX_SKIP_FRACTION.value)
  except jsonl_to_shards.SkipFractionError as e:
    print(json.dumps(e.summary | {"written": 0, "error": str(e)}, ensure_ascii=False))
    print(f"build_shards: {e}", file=sys.stderr)
    return 1
  print(json.dumps(summary, ensure_ascii=False))
  return 0 if summary["written"] > 0 else 1


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WRITE_MANIFEST.value:
    return _write_manifest()
  return _world() if _SYNTHETIC_WORLD.value else _jsonl()


if __name__ == "__main__":
  app.run(main)
