"""Builds the scene world (data_pipelines/scene_world.py) beside the image world it draws from.

  <world dir>/scenes_v{SCENES_VERSION}/
    train-0000i-of-0000n.array_record   seen classes only
    eval-00000-of-00001.array_record    a held-out class in every scene
    eval_pairs-00000-of-00001.array_record   a pair of seen classes never seen together
    scenes.json                         labels, answers, question types, held-out classes, params
    manifest.json                       written last (the directory is staged and renamed)

The scenes' texts are read with the image world's tokenizer (a system on towers trained there
reads them with the towers' own), so the scene world has none of its own. A second call with the
same parameters reuses the directory.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterator

from bigvl.data.formats.records import encode_record
from data_pipelines import parallel, scene_world, shard_writer

# v2: the eval_pairs split; training scenes never hold a held-out pair. v3: an "exists" question
# answered "no" never names a class of the scene (v2 did where every object shared the target's
# colour or shape).
SCENES_VERSION = 3
FORMAT = "bigvl.scene_world"
META = "scenes.json"


def default_dir(world_dir: str | Path) -> Path:
  return Path(world_dir) / f"scenes_v{SCENES_VERSION}"


def _write_shard_task(task: tuple[str, str, int, int, int, int, int, int]) -> dict[str, Any]:
  directory, split, shard, num_shards, start, stop, seed, image_size = task

  def records() -> Iterator[bytes]:
    for index in range(start, stop):
      yield encode_record(scene_world.make_scene(seed, split, index, image_size))

  path = Path(directory) / shard_writer.shard_filename(split, shard, num_shards)
  return {"split": split, "shard": shard, "info": shard_writer.write_shard(path, records())}


def _is_complete(directory: Path, params: dict[str, Any]) -> dict[str, Any] | None:
  manifest = shard_writer.read_manifest(directory)
  if not manifest or manifest.get("format") != FORMAT or manifest.get("params") != params:
    return None
  if not (directory / META).is_file():
    return None
  if not all(shard_writer.split_files_intact(directory, e) for e in manifest["splits"].values()):
    return None
  return manifest


def build(out_dir: str | Path, *, seed: int = 0, image_size: int = 48, num_train: int = 30000,
          num_eval: int = 1000, num_shards: int = 4,
          num_workers: int | None = None) -> dict[str, Any]:
  """Builds (or reuses) the scene world in `out_dir`; returns its manifest."""
  out_dir = Path(out_dir)
  params = {"version": SCENES_VERSION, "seed": seed, "image_size": image_size,
            "num_train": num_train, "num_eval": num_eval, "num_shards": num_shards}
  manifest = _is_complete(out_dir, params)
  if manifest is not None:
    return manifest
  if out_dir.exists():
    old = shard_writer.read_manifest(out_dir)
    if (old is None or old.get("format") != FORMAT) and any(out_dir.iterdir()):
      raise FileExistsError(f"{out_dir} exists and is not a scene-world build; refusing to "
                            "replace it")
  t0 = time.monotonic()
  sizes = {"train": (num_train, num_shards), "eval": (num_eval, 1), "eval_pairs": (num_eval, 1)}
  with shard_writer.staging_dir(out_dir) as staged:
    tasks = [(str(staged), split, k, n, start, stop, seed, image_size)
             for split, (count, n) in sizes.items()
             for k, (start, stop) in enumerate(shard_writer.shard_ranges(count, n))]
    tasks.sort(key=lambda t: t[5] - t[4], reverse=True)
    workers = parallel.default_num_workers() if num_workers is None else num_workers
    results = list(parallel.imap(_write_shard_task, tasks, min(workers, len(tasks))))
    splits = {}
    for split in sizes:
      infos = sorted((r for r in results if r["split"] == split), key=lambda r: r["shard"])
      splits[split] = shard_writer.split_entry([r["info"] for r in infos])
    shard_writer.write_json(staged / META, scene_world.describe() | {"params": params})
    manifest = {"format": FORMAT, "params": params, "splits": splits,
                "digest": shard_writer.combine_digests(splits[s]["digest"] for s in sizes)}
    shard_writer.write_json(staged / shard_writer.MANIFEST, manifest)
    manifest = shard_writer.publish_or_reuse(staged, out_dir,
                                             lambda: _is_complete(out_dir, params))
  logging.info("Built the scene world in %s in %.1f s", out_dir, time.monotonic() - t0)
  return manifest
