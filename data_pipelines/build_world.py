"""Builds the embedded default dataset: synthetic-world shards, world.json, tokenizer.

  out_dir/
    train-0000i-of-0000n.array_record      seen (colour, shape) classes only
    eval_heldout-00000-of-00001.array_record   the held-out classes only
    eval_seen-00000-of-00001.array_record      new images of seen classes
    world.json        classes, held-out list, zero-shot templates, params
    tokenizer.model   SentencePiece model trained on synthetic_world.corpus()
    manifest.json     params, per-shard counts/sizes/digests (written last)

The whole directory is staged beside `out_dir` and renamed into place, so a
directory with a manifest is always complete. A second call with the same
parameters finds that manifest and returns it without rebuilding.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from bigvl.data.formats.records import encode_record
from bigvl.tokenizers import glm, sp_train
from data_pipelines import parallel, shard_writer, synthetic_world

# Bump whenever rendering, captions or the record layout change: cached
# directories built by older code then stop matching and are rebuilt.
# v10: records and tokenizer byte-identical to v9; world.json gained "zeroshot_names" (what the
# evaluators read instead of importing this package).
# v11: evaluation records gained meta "references" (5 captions per language) and "object_mask" (the
# objects' pixels); pictures, captions and training records are v10's.
WORLD_VERSION = 11
FORMAT = "bigvl.synthetic_world"
# The corpus (with Chinese split into characters, see _isolate_cjk) admits at
# most ~500 BPE pieces; 384 already keeps every English word whole.
DEFAULT_VOCAB_SIZE = 384
DEFAULT_CORPUS_CAPTIONS = 20000
# Eval splits are small; one shard per this many records.
_EVAL_RECORDS_PER_SHARD = 5000

_CJK = re.compile(r"([\u2e80-\u9fff\u3000-\u303f\uff00-\uffef])")


def default_dir(image_size: int = 48) -> Path:
  """$BIGVL_DATA_DIR, else ~/.cache/bigvl/synthetic_world_v{WORLD_VERSION}_{image_size}."""
  env = os.environ.get("BIGVL_DATA_DIR")
  if env:
    return Path(env).expanduser()
  return Path.home() / ".cache" / "bigvl" / f"synthetic_world_v{WORLD_VERSION}_{image_size}"


def _isolate_cjk(sentences: Iterable[str]) -> Iterator[str]:
  """Fences every CJK character with a user-defined piece so BPE never merges it.

  Otherwise BPE learns whole phrases such as "红色圆形"; a held-out class would
  then be a token never seen in a training caption and zero-shot Chinese would
  fail. User-defined pieces are atomic in training, so fencing also avoids
  "▁红"-style pieces that spaces would create; at encode time, unfenced
  Chinese text therefore falls back to single characters, each trained.
  """
  sep = glm.SEP_PIECE
  for s in sentences:
    yield _CJK.sub(sep + r"\1" + sep, s)


def _write_shard_task(task: tuple[str, str, int, int, int, int, int, int]) -> dict[str, Any]:
  directory, split, shard, num_shards, start, stop, seed, image_size = task

  def records() -> Iterator[bytes]:
    for index in range(start, stop):
      yield encode_record(synthetic_world.make_example(seed, split, index, image_size))

  path = Path(directory) / shard_writer.shard_filename(split, shard, num_shards)
  info = shard_writer.write_shard(path, records())
  return {"split": split, "shard": shard, "info": info}


def _split_sizes(num_train: int, num_eval: int, num_shards: int) -> dict[str, tuple[int, int]]:
  eval_shards = max(1, math.ceil(num_eval / _EVAL_RECORDS_PER_SHARD))
  return {
      "train": (num_train, num_shards),
      "eval_heldout": (num_eval, eval_shards),
      "eval_seen": (num_eval, eval_shards),
  }


def _is_complete(directory: Path, params: dict[str, Any]) -> dict[str, Any] | None:
  manifest = shard_writer.read_manifest(directory)
  if not manifest or manifest.get("format") != FORMAT or manifest.get("params") != params:
    return None
  if not all((directory / f).is_file() for f in ("world.json", "tokenizer.model")):
    return None
  if not all(shard_writer.split_files_intact(directory, e) for e in manifest["splits"].values()):
    return None
  return manifest


def _ours_or_empty(directory: Path) -> bool:
  if not directory.exists():
    return True
  if not directory.is_dir():
    return False
  manifest = shard_writer.read_manifest(directory)
  return (manifest is not None and manifest.get("format") == FORMAT) or not any(directory.iterdir())


def build(out_dir: str | os.PathLike | None = None, *, seed: int = 0, image_size: int = 48,
          num_train: int = 60000, num_eval: int = 1200, num_shards: int = 8,
          vocab_size: int = DEFAULT_VOCAB_SIZE,
          num_corpus_captions: int = DEFAULT_CORPUS_CAPTIONS,
          num_workers: int | None = None) -> dict[str, Any]:
  """Builds (or reuses) the synthetic-world dataset in `out_dir`; returns its manifest.

  Args:
    out_dir: target directory; default_dir(image_size) when None.
    seed: world seed; records are a function of (seed, split, index) only.
    image_size: square image side in pixels.
    num_train: records in the train split (seen classes only).
    num_eval: records in each of eval_heldout and eval_seen.
    num_shards: train shards (eval splits get one per 5000 records).
    vocab_size: SentencePiece vocabulary size, specials included.
    num_corpus_captions: sampled captions in the tokenizer corpus.
    num_workers: generator processes; default one per available core. The
      output does not depend on it.

  Raises:
    FileExistsError: `out_dir` exists and holds something that is not a
      synthetic-world build (it is never deleted).
  """
  out_dir = Path(out_dir) if out_dir is not None else default_dir(image_size)
  params = {
      "version": WORLD_VERSION, "seed": seed, "image_size": image_size,
      "num_train": num_train, "num_eval": num_eval, "num_shards": num_shards,
      "vocab_size": vocab_size, "num_corpus_captions": num_corpus_captions,
  }
  manifest = _is_complete(out_dir, params)
  if manifest is not None:
    logging.info("Reusing synthetic world in %s", out_dir)
    return manifest
  if not _ours_or_empty(out_dir):
    raise FileExistsError(f"{out_dir} exists and is not a synthetic-world build; "
                          "refusing to replace it")

  start_time = time.monotonic()
  sizes = _split_sizes(num_train, num_eval, num_shards)
  with shard_writer.staging_dir(out_dir) as staged:
    tasks = [(str(staged), split, k, n, start, stop, seed, image_size)
             for split, (count, n) in sizes.items()
             for k, (start, stop) in enumerate(shard_writer.shard_ranges(count, n))]
    tasks.sort(key=lambda t: t[5] - t[4], reverse=True)  # Longest first balances workers.
    if num_workers is None:
      num_workers = parallel.default_num_workers()
    results = list(parallel.imap(_write_shard_task, tasks, min(num_workers, len(tasks))))
    sp_train.train_sentencepiece(_isolate_cjk(synthetic_world.corpus(seed, num_corpus_captions)),
                                 str(staged / "tokenizer.model"), vocab_size)

    splits = {}
    for split in sizes:
      infos = sorted((r for r in results if r["split"] == split), key=lambda r: r["shard"])
      splits[split] = shard_writer.split_entry([r["info"] for r in infos])
    world = synthetic_world.describe() | {"params": params}
    shard_writer.write_json(staged / "world.json", world)
    manifest = {
        "format": FORMAT,
        "params": params,
        "splits": splits,
        "digest": shard_writer.combine_digests(splits[s]["digest"] for s in sizes),
        "files": {name: shard_writer.file_sha256(staged / name)
                  for name in ("world.json", "tokenizer.model")},
    }
    shard_writer.write_json(staged / shard_writer.MANIFEST, manifest)
    # Another process may publish first; theirs is as good as ours if complete.
    manifest = shard_writer.publish_or_reuse(staged, out_dir, lambda: _is_complete(out_dir, params))
  logging.info("Built synthetic world in %s in %.1f s", out_dir, time.monotonic() - start_time)
  return manifest
