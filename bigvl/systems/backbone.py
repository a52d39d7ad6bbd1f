"""A trained backbone for systems that start from one (a frozen M²-Encoder under an adapter, towers
under a fusion encoder): the run `config.init_from` names, or, when it names none, one this module
trains once per machine from a named demo config and caches.

  backbone = ml_collections.ConfigDict(dict(config="m2_tiny", dir=""))

With `init_from` empty, `ensure(config)` trains `backbone.config` (a key of DEMOS) into `backbone.dir`
(default: $BIGVL_CACHE_DIR or ~/.cache/bigvl, under backbones/<name>-<digest of its config>), or
reuses the finished run there, and sets `config.init_from` to it (the workdir's config.json then
records what the run started from). A run left unfinished there (interrupted) is resumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

import jax
import ml_collections

log = logging.getLogger("bigvl")


def _m2_tiny() -> ml_collections.ConfigDict:
  from bigvl.systems.m2_encoder import config as m2_config
  from bigvl.train import config_lib
  return config_lib.finalize(m2_config.tiny_demo())


def _snp_s3_tiny() -> ml_collections.ConfigDict:
  from bigvl.systems.snp_s3 import config as snp_config
  from bigvl.train import config_lib
  return config_lib.finalize(snp_config.tiny_demo())


# Backbones a system can train itself: name → () → a finalised training config.
DEMOS: dict[str, Callable[[], ml_collections.ConfigDict]] = {"m2_tiny": _m2_tiny,
                                                            "snp_s3_tiny": _snp_s3_tiny}


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      config="m2_tiny",   # the backbone trained when init_from is "" (a key of DEMOS)
      dir="",             # where ("": the cache, see the module docstring)
  ))


def cache_root() -> Path:
  env = os.environ.get("BIGVL_CACHE_DIR")
  return Path(env).expanduser() if env else Path.home() / ".cache" / "bigvl"


def demo_config(name: str) -> ml_collections.ConfigDict:
  if name not in DEMOS:
    raise ValueError(f"backbone.config={name!r}: use one of {sorted(DEMOS)}")
  return DEMOS[name]()


def workdir_for(config: ml_collections.ConfigDict) -> str:
  """Where the backbone `config.backbone` names is trained: backbone.dir, or the cache's directory
  for its config (a changed demo config is another directory)."""
  b = config.backbone
  if b.dir:
    return b.dir
  doc = json.dumps(demo_config(b.config).to_dict(), sort_keys=True, default=str)
  digest = hashlib.sha256(doc.encode()).hexdigest()[:10]
  return str(cache_root() / "backbones" / f"{b.config}-{digest}")


def _finished(workdir: str, total_steps: int) -> bool:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return False
  with open(path, encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      if row.get("done") and row.get("step") == total_steps:
        return True
  return False


def ensure(config: ml_collections.ConfigDict) -> str:
  """`config.init_from`, or the trained backbone it is set to (trained now if need be)."""
  if config.init_from:
    return config.init_from
  from bigvl.train import loop
  workdir = workdir_for(config)
  demo = demo_config(config.backbone.config)
  if not _finished(workdir, demo.total_steps):
    log.info("init_from is empty: training the backbone %s in %s (once; later runs reuse it)",
             config.backbone.config, workdir)
    if jax.process_index() == 0:
      print(f"training the backbone {config.backbone.config} in {workdir} first (init_from is "
            "empty; later runs reuse it)", flush=True)
    loop.train(demo, workdir)
  config.init_from = workdir
  return workdir
