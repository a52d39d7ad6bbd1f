"""Builds ArrayRecord shards: from (image, caption) pairs (JSON lines, webdataset tars, parquet),
or the synthetic world.

Real data:
  python launch/build_shards.py --input=INPUT --output_dir=DIR \
      [--num_shards=N] [--split=train] [--image_size=S] [--seed=0] [--num_workers=W]
INPUT is one of (data_pipelines/to_shards.py):
  pairs.jsonl                    JSON lines: {"image": path, "caption": str or [str, ...]}
  /data/{00000..00099}.tar       webdataset tars as img2dataset writes them ({key}.jpg/.png/.webp,
                                 {key}.txt, {key}.json); a brace range keeps its zero padding
  '/data/*.tar', a.tar,b.tar     a glob (quote it), a comma-separated list
  /data/train-*.parquet          parquet: --caption_column=caption and --image_column=image
                                 (binary, or HuggingFace's {bytes, path} struct) or
                                 --image_path_column=COL (paths relative to the parquet's folder)
The format follows the extension (.tar, .parquet, else JSON lines) unless --input_format says.
Captions may be a string or a list (every one kept); ids are JSONL line numbers, or for tars and
parquet a running index (1-based) over all samples of all files in input order. Prints one JSON
line {"written", "skipped", "skipped_by_reason", "skipped_examples", "seconds", "images_per_s",
...} and exits non-zero if nothing could be written, or if more than --max_skip_fraction of the
samples were bad (then nothing is written and the error names the commonest reason). A bad flag
or input is one line on stderr and exit status 1.

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

from absl import flags  # noqa: E402

from bigvl import cli  # noqa: E402
from data_pipelines import build_world, jsonl_to_shards, to_shards  # noqa: E402

_INPUT = flags.DEFINE_string(
    "input", None, "The pairs: a JSONL file, webdataset tars or parquet files; a comma-separated "
    "list, a glob or a brace range such as /data/{00000..00099}.tar.")
_INPUT_FORMAT = flags.DEFINE_string(
    "input_format", None, "jsonl, webdataset or parquet (default: from the extension: .tar, "
    ".parquet, else jsonl).")
_CAPTION_COLUMN = flags.DEFINE_string(
    "caption_column", "caption", "Parquet: the caption column (a string or a list of strings).")
_IMAGE_COLUMN = flags.DEFINE_string(
    "image_column", "image", "Parquet: the image column (binary, or a struct with a 'bytes' "
    "field as HuggingFace datasets writes).")
_IMAGE_PATH_COLUMN = flags.DEFINE_string(
    "image_path_column", "", "Parquet: a column of image paths (relative to the parquet file's "
    "folder) instead of --image_column.")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Where shards go (for --synthetic_world: default_dir() when unset).")
_NUM_SHARDS = flags.DEFINE_integer(
    "num_shards", None, "Shards for the split (default 1; 8 train shards for the world).")
_SPLIT = flags.DEFINE_string("split", "train", "Split name used in shard file names.")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", None,
    "Pairs: downscale so the shorter side is at most this and re-encode (unset: keep bytes). "
    "World: the image side (default 48).")
_SEED = flags.DEFINE_integer(
    "seed", 0, "Pairs: shuffles records across shards (-1 keeps input order). World: its seed.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", None, "Processes (default: one per core).")
_FORCE = flags.DEFINE_bool("force", False, "Pairs: rebuild even if an identical build exists.")
_MAX_SKIP_FRACTION = flags.DEFINE_float(
    "max_skip_fraction", 0.05,
    "Pairs: fail, writing nothing, when more than this share of the samples is bad (as "
    "training's data.max_skip_fraction); 1 never fails.")
_SYNTHETIC_WORLD = flags.DEFINE_bool(
    "synthetic_world", False, "Build the embedded synthetic-world dataset instead of --input.")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 60000, "World: train records.")
_NUM_EVAL = flags.DEFINE_integer("num_eval", 1200, "World: records per eval split.")
_WRITE_MANIFEST = flags.DEFINE_string(
    "write_manifest", None, "Write manifest.json for the *.array_record shards already in this "
    "directory (counts, bytes, digest of each) instead of building shards.")


def _check_flags() -> None:
  """Refuses bad numbers before any work (one line, exit 1, via cli.run_main)."""
  if _NUM_SHARDS.value is not None and _NUM_SHARDS.value < 1:
    raise ValueError(f"--num_shards={_NUM_SHARDS.value}: must be at least 1")
  if _IMAGE_SIZE.value is not None and _IMAGE_SIZE.value <= 0:
    raise ValueError(f"--image_size={_IMAGE_SIZE.value}: must be positive (leave it unset to "
                     "keep the images' bytes)")
  if _NUM_WORKERS.value is not None and _NUM_WORKERS.value < 1:
    raise ValueError(f"--num_workers={_NUM_WORKERS.value}: must be at least 1")
  if not 0.0 <= _MAX_SKIP_FRACTION.value <= 1.0:
    raise ValueError(f"--max_skip_fraction={_MAX_SKIP_FRACTION.value}: must be in [0, 1]")
  if _OUTPUT_DIR.value:
    cli.check_writable(_OUTPUT_DIR.value, "--output_dir")


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


def _pairs() -> int:
  if not _INPUT.value:
    raise ValueError("--input is required: a JSONL file, webdataset tars or parquet files (or "
                     "pass --synthetic_world, or --write_manifest=DIR)")
  if not _OUTPUT_DIR.value:
    raise ValueError("--output_dir is required with --input")
  if _INPUT_FORMAT.value and _INPUT_FORMAT.value not in to_shards.FORMATS:
    raise ValueError(f"--input_format={_INPUT_FORMAT.value!r}: use one of "
                     f"{', '.join(to_shards.FORMATS)}")
  try:
    summary = to_shards.convert(
        _INPUT.value, _OUTPUT_DIR.value, input_format=_INPUT_FORMAT.value,
        caption_column=_CAPTION_COLUMN.value, image_column=_IMAGE_COLUMN.value,
        image_path_column=_IMAGE_PATH_COLUMN.value, split=_SPLIT.value,
        num_shards=_NUM_SHARDS.value or 1, image_size=_IMAGE_SIZE.value, seed=_SEED.value,
        num_workers=_NUM_WORKERS.value, force=_FORCE.value,
        max_skip_fraction=_MAX_SKIP_FRACTION.value)
  except jsonl_to_shards.SkipFractionError as e:
    print(json.dumps(e.summary | {"written": 0, "error": str(e)}, ensure_ascii=False))
    print(f"build_shards.py: SkipFractionError: {e}", file=sys.stderr)
    return 1
  print(json.dumps(summary, ensure_ascii=False))
  if summary["written"] == 0:
    print(f"build_shards.py: nothing was written ({summary['skipped']} samples skipped)",
          file=sys.stderr)
    return 1
  return 0


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
  _check_flags()
  if _WRITE_MANIFEST.value:
    return _write_manifest()
  return _world() if _SYNTHETIC_WORLD.value else _pairs()


if __name__ == "__main__":
  cli.run_main(main, "build_shards.py")
