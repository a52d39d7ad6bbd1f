"""The one training loop. A system (bigvl.systems) brings the model, its loss, data and evals.

Read top to bottom: config → system → mesh → model and optimizer (shapes first, then created
sharded) → checkpoint restore → jitted update step → loop with logging, checkpoints and evals.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bigvl import losses, systems
from bigvl.data import pipeline
from bigvl.parallel import guard, mesh as mesh_lib
from bigvl.parallel import sharding
from bigvl.train import checkpoint as ckpt_lib
from bigvl.train import config_lib, metrics as metrics_lib, optim
from bigvl.train import data_report, nonfinite, preemption

log = logging.getLogger("bigvl")


def params_sha256(params: Any) -> str:
  """Digest of every parameter's bytes, in sorted path order: equal digests ⇔ bit-identical params."""
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_leaves_with_path(params)
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      # Sharded over several processes: every process gathers it (one leaf at a time).
      from jax.experimental import multihost_utils
      leaf = multihost_utils.process_allgather(leaf, tiled=True)
    arr = np.asarray(jax.device_get(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str(arr.dtype).encode() + str(arr.shape).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  return h.hexdigest()


def _global_batch(local: dict[str, np.ndarray], sharding_: NamedSharding) -> dict[str, jax.Array]:
  # Each process contributes its own rows; together they form the global batch.
  return {k: jax.make_array_from_process_local_data(sharding_, v) for k, v in local.items()}


class Trainer(NamedTuple):
  """Everything `build` derives from a config: the sharded train step and the shapes around it."""
  system: Any
  mesh: Mesh
  rules: tuple
  dp: int                      # data-parallel size (batch shards)
  accum: int                   # GradCache micro-batches
  graphdef: Any
  tx: optax.GradientTransformation
  schedule: Any
  abstract: dict[str, Any]     # the train state as ShapeDtypeStructs (unsharded)
  state_shardings: dict[str, Any]
  batch_sharding: NamedSharding
  init: Callable[[jax.Array], dict[str, Any]]   # rng → train state (jit it with state_shardings)
  step_fn: Any                 # jitted (state, batch) → (state, metrics); the state is donated
  batch_spec: dict[str, jax.ShapeDtypeStruct]   # the global batch, sharded
  num_params: int


def build(config: ml_collections.ConfigDict, *, system: Any = None, mesh: Mesh | None = None,
          devices: Sequence[jax.Device] | None = None) -> Trainer:
  """The train step of `config`, shapes first and nothing allocated: what `train` runs and what
  `launch/plan.py` compiles ahead of time for a TPU topology.

  `system` defaults to a fresh one (without data: the model takes the variant's vocabulary);
  `mesh` defaults to `config.mesh` over `devices` (default: all devices).
  """
  if system is None:
    system = systems.build(config)

  # ---------------------------------------------------------------- mesh
  if mesh is None:
    mesh = mesh_lib.make_mesh(dict(config.mesh), devices)
  rules = tuple(config.sharding_rules or mesh_lib.DEFAULT_RULES)
  dp = mesh_lib.data_parallel_size(mesh, rules)
  accum = config.loss.accum_steps
  if config.batch_size % (dp * accum) or config.batch_size % jax.process_count():
    raise config_lib.ConfigError(
        f"batch_size={config.batch_size} must be divisible by the data-parallel size {dp} times "
        f"loss.accum_steps={accum}, and by the process count {jax.process_count()}")
  system.set_mesh(mesh, rules)
  repl = NamedSharding(mesh, P())
  batch_sharding = mesh_lib.batch_sharding(mesh, rules)

  # ---------------------------------------------------------------- model and optimizer
  tx, schedule = optim.make_optimizer(config, config.total_steps)
  graphdef, _, param_shardings = mesh_lib.model_shapes(system.make_model, mesh, rules)

  def init(rng: jax.Array) -> dict[str, Any]:
    with nnx.var_defaults(ref=True):  # see mesh_lib.model_shapes: linear, not quadratic, in depth
      rngs = nnx.Rngs(params=rng)
    model = system.make_model(rngs)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  abstract = jax.eval_shape(init, jax.random.key(config.seed))
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, abstract["opt_state"], param_shardings,
      transform_non_params=lambda _: repl)
  state_shardings = {"step": repl, "params": param_shardings, "opt_state": opt_shardings}
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract["params"]))
  guard.check_fsdp(abstract["params"], param_shardings, min_bytes=config.sharding_guard_min_bytes)

  # ---------------------------------------------------------------- update step
  def train_step(state, batch):
    # GradCache: with accum_steps K the contrastive batch is the whole global batch while only one
    # micro-batch's activations are alive at a time (K=1 is a plain value_and_grad).
    embed_fn = lambda p, mb: system.embed(nnx.merge(graphdef, p), mb)
    loss_fn = lambda p, emb: system.embedding_loss(nnx.merge(graphdef, p), emb)
    (loss, aux), grads = losses.accumulated_value_and_grad(
        embed_fn, loss_fn, state["params"], batch, accum, num_shards=dp)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = system.post_update(optax.apply_updates(state["params"], updates))
    # A non-finite loss or gradient skips the update; the step (and its batch) still counts.
    grad_norm = optax.tree.norm(grads)
    ok = nonfinite.is_finite(loss, grad_norm)
    params = nonfinite.guarded_update(ok, params, state["params"])
    opt_state = nonfinite.guarded_update(ok, opt_state, state["opt_state"])
    step = state["step"] + 1
    out = {"train/loss": loss, "train/grad_norm": grad_norm, "train/nonfinite": ~ok,
           "train/lr": schedule(state["step"]), **{f"train/{k}": v for k, v in aux.items()}}
    return {"step": step, "params": params, "opt_state": opt_state}, out

  def traced_step(state, batch):
    # Activation constraints follow this mesh and rules wherever the step is traced (loop or AOT).
    with sharding.use_rules(mesh, rules):
      return train_step(state, batch)

  step_fn = jax.jit(traced_step, in_shardings=(state_shardings, batch_sharding),
                    out_shardings=(state_shardings, repl), donate_argnums=0)
  batch_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
                for k, v in system.batch_spec(config.batch_size).items()}
  return Trainer(system=system, mesh=mesh, rules=rules, dp=dp, accum=accum, graphdef=graphdef,
                 tx=tx, schedule=schedule, abstract=abstract, state_shardings=state_shardings,
                 batch_sharding=batch_sharding, init=init, step_fn=step_fn, batch_spec=batch_spec,
                 num_params=num_params)


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_at: int | None = None,
          devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
  """Trains (or resumes) to `config.total_steps`; returns the last logged metrics.

  `stop_at` ends this invocation early at that step, with a checkpoint, as an interruption would;
  the schedule still runs to `total_steps` when training is resumed. `devices` (default: all) are
  the mesh's devices, e.g. one of them for a single-device reference run.
  """
  devices = jax.devices() if devices is None else list(devices)
  # ---------------------------------------------------------------- config and system
  config_lib.validate(config, num_devices=len(devices), num_processes=jax.process_count())
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  system = systems.build(config)
  system.prepare(workdir)

  t = build(config, system=system, devices=devices)
  mesh, rules, accum, tx = t.mesh, t.rules, t.accum, t.tx
  graphdef, abstract, state_shardings = t.graphdef, t.abstract, t.state_shardings
  param_shardings, batch_sharding, init = t.state_shardings["params"], t.batch_sharding, t.init
  log.info("mesh %s, %d process(es), global batch %d", dict(mesh.shape), jax.process_count(),
           config.batch_size)
  log.info("model: %s parameters", f"{t.num_params:,}")

  # ---------------------------------------------------------------- data and checkpoint restore
  # This process reads the rows of each global batch that its devices hold (one global stream, so
  # the data does not depend on the number of processes).
  local_batch, block, blocks = mesh_lib.process_batch_block(batch_sharding, config.batch_size)
  data_it = system.train_iterator(local_batch, block, blocks)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
  start = ckpt.latest_step()
  if start is not None:
    target = mesh_lib.sharded_shapes(abstract, state_shardings)
    state = ckpt.restore(start, target, data_it, resume_data=lambda fresh: pipeline.resume_state(
        fresh, start, local_batch))  # Saved by another number of processes: global batch `start`.
    log.info("resumed from step %d (%s)", start, ckpt.directory)
  elif config.init_from:
    # Fine-tuning: parameters from another run or an imported checkpoint, fresh optimizer state.
    from bigvl.export import params_io
    start = 0
    target = mesh_lib.sharded_shapes(abstract["params"], param_shardings)
    params = params_io.load_params(config.init_from, target)
    state = jax.jit(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p,
                               "opt_state": tx.init(p)},
                    out_shardings=state_shardings)(params)
    log.info("initialised from %s", config.init_from)
  else:
    start = 0
    state = jax.jit(init, out_shardings=state_shardings)(jax.random.key(config.seed))

  def latest_checkpoint() -> str:
    saved = ckpt.latest_step()
    return "none yet" if saved is None else os.path.join(ckpt.directory, str(saved))

  step_fn = t.step_fn
  evaluators = system.evaluators()
  encoder = system.encoder(graphdef, mesh)

  def run_evals(step: int, final: bool) -> dict[str, float]:
    out = {}
    for name, ev in evaluators.items():
      if (final and ev.every == 0) or (ev.every and step % ev.every == 0):
        t0 = time.time()
        out.update(ev.run(encoder(state["params"])))
        log.info("eval %s took %.1fs", name, time.time() - t0)
    return out

  # ---------------------------------------------------------------- loop
  progress = metrics_lib.Progress(start, config.total_steps)
  nonfinite_steps = nonfinite.NonfiniteGuard(config.max_nonfinite_in_a_row, latest_checkpoint)
  last: dict[str, Any] = {}
  stopped_early = False
  with sharding.use_rules(mesh, rules), preemption.Preemption() as preempt:
    for step in range(start + 1, config.total_steps + 1):
      local = next(data_it)
      local.pop("id", None)
      batch = _global_batch(local, batch_sharding)
      with jax.transfer_guard_host_to_device("disallow"):
        state, m = step_fn(state, batch)
      nonfinite_steps.add(step, m["train/nonfinite"])
      final = step == config.total_steps
      if step % config.log_every == 0 or final or step == start + 1:
        last = {k: float(v) for k, v in jax.device_get(m).items()}
        last.update(progress.update(step))
        last.update(data_report.stats(data_it),
                    **{"train/nonfinite_skipped": nonfinite_steps.total})
        if is_main:
          print(metrics_lib.Progress.line(step, config.total_steps, last), flush=True)
        writer.write(step, last)
      preempted = preempt.should_stop(step)
      if step % config.checkpoint_every == 0 or final or step == stop_at or preempted:
        nonfinite_steps.settle()
        if nonfinite_steps.in_a_row:  # These parameters led into the streak: keep older ones.
          log.warning("step %d: not saved, %d non-finite steps in a row", step,
                      nonfinite_steps.in_a_row)
        else:
          ckpt.save(step, state, data_it)
      if (step == stop_at or preempted) and not final:
        why = (preempt.requested or "a signal to another process") if preempted else "stop_at"
        saved = "not saved; the latest is" if nonfinite_steps.in_a_row else "checkpoint saved in"
        msg = (f"{why}: stopped after step {step}, {saved} {latest_checkpoint()}; the same "
               "command resumes")
        log.warning(msg)
        if is_main:
          print(msg, flush=True)
        stopped_early = True
        break
      ev = run_evals(step, final)
      if ev:
        writer.write(step, ev)
        last.update(ev)
        if is_main:
          print("  ".join(f"{k} {v:.4f}" for k, v in sorted(ev.items())), flush=True)
    if start >= config.total_steps:  # Resumed a finished run: report its final evaluation again.
      last = run_evals(config.total_steps, True)
      writer.write(config.total_steps, last)
  nonfinite_steps.settle()
  summary = {**data_report.stats(data_it), "train/nonfinite_skipped": nonfinite_steps.total,
             "data/ids_sha256": data_report.ids_sha256(data_it),
             "params_sha256": params_sha256(state["params"])}
  if not stopped_early:
    writer.write(config.total_steps, {**summary, "done": True})
  last.update(summary)
  ckpt.close()
  writer.close()
  return last
