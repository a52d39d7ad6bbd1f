"""Evaluate a checkpoint with a config's evaluators, outside training; and load one for a notebook."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable

import jax
import ml_collections

from bigvl import systems
from bigvl.parallel import mesh as mesh_lib
from bigvl.train import config_lib

log = logging.getLogger("bigvl")


@dataclasses.dataclass
class Loaded:
  """A checkpoint ready to embed: `encoder` is `system.encoder(...)(params)`."""
  config: ml_collections.ConfigDict
  system: Any
  mesh: Any
  params: Any
  encoder: Any
  make_encoder: Callable[[Any], Any]
  step: int | None
  source: str

  @property
  def tokenizer(self):
    return self.system.tokenizer


def load(config: ml_collections.ConfigDict, workdir: str, *, checkpoint: str = "",
         step: int | None = None) -> Loaded:
  """The parameters of `checkpoint` (a params directory from launch/import_torch.py or another
  run's workdir) or else of `workdir`'s latest (or `step`) checkpoint, sharded over all devices."""
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
  make_encoder = system.encoder(graphdef, mesh)
  return Loaded(config, system, mesh, params, make_encoder(params), make_encoder, step,
                os.path.abspath(source))


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, checkpoint: str = "",
             step: int | None = None, only: list[str] | None = None) -> dict[str, Any]:
  """Runs every evaluator of `config` that is on (or those named in `only`) on a checkpoint (see
  `load`). Returns the metrics, with `step` and `checkpoint` describing what was evaluated."""
  m = load(config, workdir, checkpoint=checkpoint, step=step)
  out: dict[str, Any] = {}
  evaluators = m.system.evaluators(only)
  if not evaluators:
    log.warning("no evaluation is on: give an eval a source (--config.evals.NAME.source=…)")
  for name, ev in evaluators.items():
    t0 = time.time()
    out.update(ev.run(m.encoder))
    log.info("eval %s took %.1fs", name, time.time() - t0)
  out["step"] = m.step
  out["checkpoint"] = m.source
  return out


def run_config(workdir: str, **overrides) -> ml_collections.ConfigDict:
  """The config a run was trained with, from its `config.json`, on top of today's defaults (keys
  added since keep their defaults); `overrides` are dotted keys ("data.dir": …)."""
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  c = config_lib.base_config()

  def merge(node: ml_collections.ConfigDict, values: dict[str, Any], prefix: str):
    for k, v in values.items():
      if isinstance(v, dict) and k == "evals" and not prefix:
        node.evals = ml_collections.ConfigDict()   # the run's evals, not today's defaults
        for name, entry in v.items():
          node.evals[name] = config_lib.eval_config()
          merge(node.evals[name], entry, f"evals.{name}.")
      elif isinstance(v, dict) and k in node and isinstance(node[k], ml_collections.ConfigDict):
        merge(node[k], v, f"{prefix}{k}.")
      elif k in node:
        node[k] = _as_tuples(v) if isinstance(v, list) else v
      else:
        log.warning("%s: key %s%s is not in today's config: ignored", workdir, prefix, k)

  merge(c, saved, "")
  for key, v in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return config_lib.finalize(c)


def _as_tuples(v):
  return tuple(_as_tuples(x) for x in v) if isinstance(v, list) else v


def write_jsonl(path: str, row: dict[str, Any]) -> None:
  if jax.process_index() != 0:
    return
  with open(path, "a") as f:
    f.write(json.dumps(row, ensure_ascii=False) + "\n")
