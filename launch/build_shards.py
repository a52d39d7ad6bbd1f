"""Builds ArrayRecord shards: from (image, caption) pairs (JSON lines, webdataset tars, parquet),
from (video, captions) sets (video JSON lines, MSR-VTT), or the synthetic world.

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

Videos (data_pipelines/video_to_shards.py), records of sampled JPEG frames and every caption:
  python launch/build_shards.py --input_format=video_jsonl --input=clips.jsonl --output_dir=DIR \
      [--frames=8] [--fps=F] [--frame_size=224] [--min_frames=N] [--num_shards=N] [--split=train]
  python launch/build_shards.py --input_format=msrvtt --input=MSRVTT/train_val_videodatainfo.json \
      --msrvtt_split=train --video_dir=MSRVTT/videos/all --output_dir=DIR --split=train
clips.jsonl: {"video": path, "caption": str or [str, ...]} per line (optional "start" / "end"
seconds). MSR-VTT: its *_videodatainfo.json (or their folder); --msrvtt_split keeps one "split"
(train, validate, test; unset: every video of the file). Frames are sampled uniformly over each
clip (the centres of --frames equal segments), or every 1/--fps seconds from its start (at most
--frames); a video that is missing, undecodable or has fewer than --min_frames frames is skipped
and counted. The JSON line has "videos_per_s" for "images_per_s".

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
from data_pipelines import build_world, jsonl_to_shards, to_shards, video_to_shards  # noqa: E402

_INPUT = flags.DEFINE_string(
    "input", None, "The pairs: a JSONL file, webdataset tars or parquet files; a comma-separated "
    "list, a glob or a brace range such as /data/{00000..00099}.tar.")
_INPUT_FORMAT = flags.DEFINE_string(
    "input_format", None, "jsonl, webdataset or parquet (default: from the extension: .tar, "
    ".parquet, else jsonl); video_jsonl or msrvtt for videos.")
_CAPTION_COLUMN = flags.DEFINE_string(
    "caption_column", "caption", "Parquet: the caption column (a string or a list of strings).")
_IMAGE_COLUMN = flags.DEFINE_string(
    "image_column", "image", "Parquet: the image column (binary, or a struct with a 'bytes' "
    "field as HuggingFace datasets writes).")
_IMAGE_PATH_COLUMN = flags.DEFINE_string(
    "image_path_column", "", "Parquet: a column of image paths (relative to the parquet file's "
    "folder) instead of --image_column.")
_FRAMES = flags.DEFINE_integer("frames", 8, "Videos: frames sampled per clip.")
_FPS = flags.DEFINE_float(
    "fps", None, "Videos: sample every 1/fps seconds from the clip's start (at most --frames) "
    "instead of uniformly over the clip.")
_FRAME_SIZE = flags.DEFINE_integer(
    "frame_size", 224, "Videos: frames resized so the shorter side is this, then centre-cropped "
    "square (0 keeps the video's size).")
_MIN_FRAMES = flags.DEFINE_integer(
    "min_frames", None, "Videos: skip clips with fewer distinct frames than this (default "
    "--frames).")
_VIDEO_DIR = flags.DEFINE_string(
    "video_dir", "", "MSR-VTT: the folder of {video_id}.mp4 (default: beside the JSON, or its "
    "TrainValVideo/, TestVideo/, videos/all/).")
_MSRVTT_SPLIT = flags.DEFINE_string(
    "msrvtt_split", "", "MSR-VTT: keep the videos of this \"split\" (train, validate, test; "
    "unset: all of the file's).")
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
  if _FRAMES.value < 1:
    raise ValueError(f"--frames={_FRAMES.value}: must be at least 1")
  if _FPS.value is not None and _FPS.value <= 0:
    raise ValueError(f"--fps={_FPS.value}: must be positive (leave it unset to sample uniformly)")
  if _FRAME_SIZE.value < 0:
    raise ValueError(f"--frame_size={_FRAME_SIZE.value}: must be positive (0 keeps the size)")
  if _MIN_FRAMES.value is not None and not 1 <= _MIN_FRAMES.value <= _FRAMES.value:
    raise ValueError(f"--min_frames={_MIN_FRAMES.value}: must be between 1 and --frames")
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
    raise ValueError("--input is required: a JSONL file, webdataset tars or parquet files, "
                     "video JSON lines or MSR-VTT's JSON with --input_format (or pass "
                     "--synthetic_world, or --write_manifest=DIR)")
  if not _OUTPUT_DIR.value:
    raise ValueError("--output_dir is required with --input")
  formats = to_shards.FORMATS + video_to_shards.FORMATS
  if _INPUT_FORMAT.value and _INPUT_FORMAT.value not in formats:
    raise ValueError(f"--input_format={_INPUT_FORMAT.value!r}: use one of {', '.join(formats)}")
  video = _INPUT_FORMAT.value in video_to_shards.FORMATS
  if not video and (_VIDEO_DIR.value or _MSRVTT_SPLIT.value):
    raise ValueError("--video_dir and --msrvtt_split are for --input_format=msrvtt")
  try:
    if video:
      summary = video_to_shards.convert(
          _INPUT.value, _OUTPUT_DIR.value, input_format=_INPUT_FORMAT.value, split=_SPLIT.value,
          num_shards=_NUM_SHARDS.value or 1, frames=_FRAMES.value, fps=_FPS.value,
          frame_size=_FRAME_SIZE.value, min_frames=_MIN_FRAMES.value,
          video_dir=_VIDEO_DIR.value, msrvtt_split=_MSRVTT_SPLIT.value, seed=_SEED.value,
          num_workers=_NUM_WORKERS.value, force=_FORCE.value,
          max_skip_fraction=_MAX_SKIP_FRACTION.value)
    else:
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
