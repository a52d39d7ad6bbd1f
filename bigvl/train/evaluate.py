"""Evaluate a checkpoint with a config's evaluators, outside training."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import ml_collections

from bigvl import systems
from bigvl.parallel import mesh as mesh_lib
from bigvl.train import config_lib

log = logging.getLogger("bigvl")


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, checkpoint: str = "",
             step: int | None = None) -> dict[str, Any]:
  """Runs every evaluator of `config` on the parameters of `checkpoint` (a params directory from
  launch/import_torch.py or another run's workdir) or else of `workdir`'s latest (or `step`)
  checkpoint. Returns the metrics, with `step` and `checkpoint` describing what was evaluated."""
  from bigvl.export import params_io
  config_lib.validate(config)
  system = systems.build(config)
  source = checkpoint or workdir
  if params_io.is_params_dir(source) and not config.tokenizer.path:
    # An imported directory carries the tokenizer its weights were made with.
    with config.unlocked():
      config.tokenizer.path = os.path.join(source, params_io.read_config(source)["tokenizer"]["file"])
  # A run evaluates with its own pinned tokenizer (see ContrastiveSystem.prepare).
  pinned = os.path.join(source, "tokenizer.model")
  system.prepare(source if os.path.exists(pinned) else None)
  mesh = mesh_lib.make_mesh(dict(config.mesh))
  rules = tuple(config.sharding_rules or mesh_lib.DEFAULT_RULES)
  graphdef, abstract, shardings = mesh_lib.model_shapes(system.make_model, mesh, rules)
  target = mesh_lib.sharded_shapes(abstract, shardings)
  if params_io.is_params_dir(source):
    step = None
  elif step is None:
    step = params_io.checkpoint_step(source)
  params = params_io.load_params(source, target, step=step)
  encoder = system.encoder(graphdef, mesh)(params)
  out: dict[str, Any] = {}
  for name, ev in system.evaluators().items():
    t0 = time.time()
    out.update(ev.run(encoder))
    log.info("eval %s took %.1fs", name, time.time() - t0)
  out["step"] = step
  out["checkpoint"] = os.path.abspath(source)
  return out


def write_jsonl(path: str, row: dict[str, Any]) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(row, ensure_ascii=False) + "\n")
