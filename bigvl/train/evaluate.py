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
from bigvl.evaluators import kinds
from bigvl.parallel import mesh as mesh_lib
from bigvl.train import config_lib, optim

log = logging.getLogger("bigvl")


def predictor_factory(system: Any, mesh: Any) -> Callable[[Any], Any]:
  """params (trained and frozen, merged) → the system's predictors bound to them, their batches
  split over every device of `mesh` (all processes); jitted once, reused by every evaluation. The
  predictors run the system's evaluation model (`make_eval_model`: float32 where training computes
  in bfloat16; the same parameters)."""
  from bigvl.evaluators import common
  graphdef = mesh_lib.model_shapes(system.make_eval_model, mesh, system.rules)[0]
  sizes = [ev.batch_size for ev in system.config.evals.values()] or [256]
  return common.sharded_predictor(system.predictors(graphdef), mesh, batch_size=max(sizes))


@dataclasses.dataclass
class Loaded:
  """A checkpoint ready to evaluate: `predictor` is `make_predictor(params)`, with `run(name,
  rows)` for each of the system's predictors."""
  config: ml_collections.ConfigDict
  system: Any
  mesh: Any
  params: Any
  predictor: Any
  make_predictor: Callable[[Any], Any]
  step: int | None
  source: str

  @property
  def tokenizer(self):
    return getattr(self.system, "tokenizer", None)


def load(config: ml_collections.ConfigDict, workdir: str, *, checkpoint: str = "",
         step: int | None = None) -> Loaded:
  """The parameters of `checkpoint` (a params directory from launch/import_torch.py or another
  run's workdir) or else of `workdir`'s latest (or `step`) checkpoint, sharded over all devices;
  a workdir's frozen weights are read with them."""
  from bigvl.export import params_io
  config_lib.validate(config, training=False)   # evaluation needs no training shards
  mesh = mesh_lib.make_mesh(dict(config.mesh))
  rules = mesh_lib.config_rules(config)
  system = systems.build(config, mesh, rules)
  source = checkpoint or workdir
  system.prepare_for_checkpoint(source)
  _, abstract, shardings = mesh_lib.model_shapes(system.make_model, mesh, rules)
  target = mesh_lib.sharded_shapes(abstract, shardings)
  if params_io.is_params_dir(source):
    step = None
  elif step is None:
    step = params_io.checkpoint_step(source)
  loaded, report = params_io.load_matching(source, target, step=step)
  if report["left_at_init"]:
    raise params_io.CheckpointMismatchError(
        f"{source} lacks {len(report['left_at_init'])} of the model's parameters, e.g. "
        f"{report['left_at_init'][:3]}: is it from another model?")
  if report["unused"]:
    raise params_io.CheckpointMismatchError(
        f"{source} has parameter {report['unused'][0]!r} that the model lacks "
        f"({len(report['unused'])} such)")
  params = jax.tree_util.tree_map_with_path(
      lambda p, _: loaded[optim.path_str(p)], target)
  make_predictor = predictor_factory(system, mesh)
  return Loaded(config, system, mesh, params, make_predictor(params), make_predictor, step,
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
    out.update(ev.run(m.predictor))
    log.info("eval %s took %.1fs", name, time.time() - t0)
  out["step"] = m.step
  out["checkpoint"] = m.source
  return out


def verify_run(workdir: str) -> dict[str, list[str]]:
  """What is wrong with each checkpoint of the run in `workdir` ({step or "frozen": problems};
  [] = good), changing nothing (launch/verify_checkpoint.py). Uses the run's own config."""
  from bigvl.train import checkpoint, loop
  config = run_config(workdir)
  mesh = mesh_lib.make_mesh(dict(config.mesh))
  system = systems.build(config, mesh, mesh_lib.config_rules(config))
  system.prepare_for_checkpoint(workdir)   # the run's tokenizer fixes the model's sizes
  state, frozen = loop.build(config, system=system).shapes()
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  out = {str(step): ckpt.verify_step(step, state) for step in sorted(ckpt.all_steps())}
  ckpt.close()
  if jax.tree.leaves(frozen):
    try:
      checkpoint.FrozenStore(workdir).restore(frozen)
      out["frozen"] = []
    except (checkpoint.CorruptCheckpointError, checkpoint.CheckpointMismatchError) as e:
      out["frozen"] = [str(e)]
  return out


def run_config(workdir: str, **overrides) -> ml_collections.ConfigDict:
  """The config a run was trained with, from its `config.json`, on top of today's defaults (keys
  added since keep their defaults); `overrides` are dotted keys ("data.dir": …)."""
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  c = config_lib.full_config(saved.get("system", ""))

  def merge(node: ml_collections.ConfigDict, values: dict[str, Any], prefix: str):
    for k, v in values.items():
      if isinstance(v, dict) and k == "evals" and not prefix:
        node.evals = ml_collections.ConfigDict()   # the run's evals, not today's defaults
        for name, entry in v.items():
          node.evals[name] = kinds.eval_config(kind=kinds.kind_of(name, entry))
          merge(node.evals[name], entry, f"evals.{name}.")
      elif isinstance(v, dict) and k in node and isinstance(node[k], ml_collections.ConfigDict):
        merge(node[k], v, f"{prefix}{k}.")
      elif k in node:
        node[k] = _as_tuples(v) if isinstance(v, list) else v
      else:
        log.warning("%s: key %s%s is not in today's config: ignored", workdir, prefix, k)

  merge(c, saved, "")
  return config_lib.finalize(config_lib.set_dotted(c, overrides))


def _as_tuples(v):
  return tuple(_as_tuples(x) for x in v) if isinstance(v, list) else v


def write_jsonl(path: str, row: dict[str, Any]) -> None:
  if jax.process_index() != 0:
    return
  with open(path, "a") as f:
    f.write(json.dumps(row, ensure_ascii=False) + "\n")
