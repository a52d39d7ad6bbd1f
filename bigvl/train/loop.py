"""The one training loop. A system (bigvl.systems.base.System) brings the model, its loss, data
and evals; the loop owns the train state {step, params, extra, opt_state}, the frozen weights beside
it, the per-step random key, checkpoints with the data position, metrics, progress, preemption,
non-finite guards and the eval schedule.

Read top to bottom: config → mesh → system → model and optimizer (shapes first, then created
sharded) → checkpoint restore → jitted update step → loop with logging, checkpoints and evals.
"""

from __future__ import annotations

import hashlib
import json
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

from bigvl import systems
from bigvl.data import stream
from bigvl.parallel import guard, mesh as mesh_lib
from bigvl.parallel import sharding
from bigvl.train import checkpoint as ckpt_lib
from bigvl.train import config_lib, metrics as metrics_lib, optim
from bigvl.train import data_report, evaluate, nonfinite, preemption, verify
from bigvl.train import lock as lock_lib
from bigvl.train import workdir as workdir_lib

log = logging.getLogger("bigvl")


def params_sha256(params: Any, extra: Any = None) -> str:
  """Digest of every parameter's bytes, in sorted path order: equal digests ⇔ bit-identical params.
  `extra` state (EMA weights, queues), when it has any leaf, is digested after them."""
  h = hashlib.sha256()
  for tree, prefix in ((params, ""), (extra or {}, "extra")):
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
      if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        # Sharded over several processes: every process gathers it (one leaf at a time).
        from jax.experimental import multihost_utils
        leaf = multihost_utils.process_allgather(leaf, tiled=True)
      arr = np.asarray(jax.device_get(leaf))
      h.update((prefix + jax.tree_util.keystr(path)).encode())
      h.update(str(arr.dtype).encode() + str(arr.shape).encode())
      h.update(np.ascontiguousarray(arr).tobytes())
  return h.hexdigest()


def merge_params(params: dict[str, Any], frozen: dict[str, Any]) -> dict[str, Any]:
  """The trained and the frozen parameters as one nested dict (they never share a leaf)."""
  out = dict(params)
  for k, v in frozen.items():
    out[k] = merge_params(out[k], v) if isinstance(v, dict) and k in out else v
  return out


def _global_batch(local: dict[str, np.ndarray], sharding_: NamedSharding) -> dict[str, jax.Array]:
  # Each process contributes its own rows; together they form the global batch.
  return {k: jax.make_array_from_process_local_data(sharding_, v) for k, v in local.items()}


class Trainer(NamedTuple):
  """Everything `build` derives from a config: the sharded train step and the shapes around it."""
  system: Any
  mesh: Mesh
  rules: tuple
  dp: int                      # data-parallel size (batch shards)
  accum: int                   # micro-batches per step (system.accum_steps)
  graphdef: Any
  tx: optax.GradientTransformation
  schedule: Any
  abstract: dict[str, Any]     # the train state {step, params, extra, opt_state} (unsharded shapes)
  state_shardings: dict[str, Any]
  frozen_abstract: dict[str, Any]   # the frozen parameters (not in the state: never updated)
  frozen_shardings: dict[str, Any]
  batch_sharding: NamedSharding
  init: Callable[[jax.Array], tuple[dict[str, Any], dict[str, Any]]]  # rng → (state, frozen)
  make_state: Callable[[dict, dict], dict[str, Any]]  # (params, frozen) → state at step 0
  step_fn: Any                 # jitted (state, frozen, batch) → (state, metrics); state donated
  batch_spec: dict[str, jax.ShapeDtypeStruct]   # the global batch, sharded
  num_params: int              # trained and frozen
  num_trainable: int

  def shapes(self) -> tuple[Any, Any]:
    """(state, frozen) as sharded ShapeDtypeStructs: what `step_fn.lower` and restores take."""
    return (mesh_lib.sharded_shapes(self.abstract, self.state_shardings),
            mesh_lib.sharded_shapes(self.frozen_abstract, self.frozen_shardings))


def _extra_shardings(abstract_extra: Any, abstract_params: Any, param_shardings: Any,
                     repl: NamedSharding) -> Any:
  """A leaf of `extra` whose path ends with a parameter's path and has its shape (EMA weights,
  momentum encoders) is sharded like that parameter; anything else is replicated."""
  by_path = {jax.tree_util.keystr(p): (a.shape, s) for (p, a), s in zip(
      jax.tree_util.tree_leaves_with_path(abstract_params), jax.tree.leaves(param_shardings))}

  def pick(path, leaf):
    key = jax.tree_util.keystr(path)
    for ppath, (shape, s) in by_path.items():
      if key.endswith(ppath) and tuple(shape) == tuple(leaf.shape):
        return s
    return repl
  return jax.tree_util.tree_map_with_path(pick, abstract_extra)


def build(config: ml_collections.ConfigDict, *, system: Any = None, mesh: Mesh | None = None,
          devices: Sequence[jax.Device] | None = None) -> Trainer:
  """The train step of `config`, shapes first and nothing allocated: what `train` runs and what
  `launch/plan.py` compiles ahead of time for a TPU topology.

  `mesh` defaults to `config.mesh` over `devices` (default: all devices); `system` to a fresh one
  on that mesh (not prepared: a model then takes its sizes from the config alone).
  """
  # ---------------------------------------------------------------- mesh and system
  rules = mesh_lib.config_rules(config)
  if mesh is None:
    mesh = system.mesh if system is not None else mesh_lib.make_mesh(dict(config.mesh), devices)
  if system is None:
    system = systems.build(config, mesh, rules)
  dp = mesh_lib.data_parallel_size(mesh, rules)
  accum = system.accum_steps
  if config.batch_size % (dp * accum) or config.batch_size % jax.process_count():
    raise config_lib.ConfigError(
        f"batch_size={config.batch_size} must be divisible by the data-parallel size {dp} times "
        f"accum_steps={accum}, and by the process count {jax.process_count()}")
  repl = NamedSharding(mesh, P())
  batch_sharding = mesh_lib.batch_sharding(mesh, rules)

  # ---------------------------------------------------------------- model and optimizer
  schedule = optim.lr_schedule(config.optim, config.total_steps)
  tx = system.optimizer(schedule)
  trainable = system.trainable
  frozen_filter = nnx.All(nnx.Param, nnx.Not(trainable))
  graphdef, (_, frozen_abstract), (param_shardings, frozen_shardings) = mesh_lib.split_shapes(
      system.make_model, mesh, rules, (trainable, frozen_filter))

  def make_state(params, frozen):
    del frozen  # the frozen weights are never part of the train state
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "extra": system.init_extra(params), "opt_state": tx.init(params)}

  def init(rng: jax.Array):
    with nnx.var_defaults(ref=True):  # see mesh_lib.model_shapes: linear, not quadratic, in depth
      rngs = nnx.Rngs(params=rng)
    model = system.make_model(rngs)
    params = nnx.to_pure_dict(nnx.state(model, trainable))
    frozen = nnx.to_pure_dict(nnx.state(model, frozen_filter))
    return make_state(params, frozen), frozen

  abstract, _ = jax.eval_shape(init, jax.random.key(config.seed))
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, abstract["opt_state"], param_shardings,
      transform_non_params=lambda _: repl)
  state_shardings = {"step": repl, "params": param_shardings,
                     "extra": _extra_shardings(abstract["extra"], abstract["params"],
                                               param_shardings, repl),
                     "opt_state": opt_shardings}
  count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  num_trainable = count(abstract["params"])
  guard.check_fsdp(merge_params(abstract["params"], frozen_abstract),
                   merge_params(param_shardings, frozen_shardings),
                   min_bytes=config.sharding_guard_min_bytes)
  base_key = config.seed

  # ---------------------------------------------------------------- update step
  def train_step(state, frozen, batch):
    # One key per step, from the seed and the step alone: a resumed run draws the same numbers.
    rng = jax.random.fold_in(jax.random.key(base_key), state["step"])
    scheduled = system.scheduled(state["step"])
    (loss, aux), grads, extra = system.value_and_grad_with_extra(
        graphdef, state["params"], frozen, state["extra"], {**batch, **scheduled}, rng)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    step = state["step"] + 1
    params, extra = system.post_update(optax.apply_updates(state["params"], updates), extra, step)
    # A non-finite loss, gradient or update skips the update; the step (and its batch) still counts.
    grad_norm = optax.tree.norm(grads)
    ok = nonfinite.is_finite(loss, grad_norm) & nonfinite.all_finite((params, extra, opt_state))
    params = nonfinite.guarded_update(ok, params, state["params"])
    extra = nonfinite.guarded_update(ok, extra, state["extra"])
    opt_state = nonfinite.guarded_update(ok, opt_state, state["opt_state"])
    out = {"train/loss": loss, "train/grad_norm": grad_norm, "train/nonfinite": ~ok,
           "train/lr": schedule(state["step"]), **{f"train/{k}": v for k, v in scheduled.items()},
           **{f"train/{k}": v for k, v in aux.items()}}
    return {"step": step, "params": params, "extra": extra, "opt_state": opt_state}, out

  def traced_step(state, frozen, batch):
    # Activation constraints follow this mesh and rules wherever the step is traced (loop or AOT).
    with sharding.use_rules(mesh, rules):
      return train_step(state, frozen, batch)

  step_fn = jax.jit(traced_step, in_shardings=(state_shardings, frozen_shardings, batch_sharding),
                    out_shardings=(state_shardings, repl), donate_argnums=0)
  batch_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
                for k, v in system.batch_spec(config.batch_size).items()}
  return Trainer(system=system, mesh=mesh, rules=rules, dp=dp, accum=accum, graphdef=graphdef,
                 tx=tx, schedule=schedule, abstract=abstract, state_shardings=state_shardings,
                 frozen_abstract=frozen_abstract, frozen_shardings=frozen_shardings,
                 batch_sharding=batch_sharding, init=init, make_state=make_state, step_fn=step_fn,
                 batch_spec=batch_spec, num_params=num_trainable + count(frozen_abstract),
                 num_trainable=num_trainable)


def _init_from(t: Trainer, config: ml_collections.ConfigDict, workdir: str, is_main: bool):
  """(state, frozen) at step 0 with the parameters `config.init_from` holds (those matching
  `config.init_from_pattern`), the rest at their init; fresh optimizer and extra state."""
  from bigvl.export import params_io
  state, frozen = jax.jit(t.init, out_shardings=(t.state_shardings, t.frozen_shardings))(
      jax.random.key(config.seed))
  target = mesh_lib.sharded_shapes(merge_params(t.abstract["params"], t.frozen_abstract),
                                   merge_params(t.state_shardings["params"], t.frozen_shardings))
  loaded, report = params_io.load_matching(config.init_from, target,
                                           pattern=config.init_from_pattern,
                                           into=config.init_from_into)
  take = lambda tree: jax.tree_util.tree_map_with_path(
      lambda p, x: loaded.get(optim.path_str(p), x), tree)
  params, frozen = take(state["params"]), take(frozen)
  del state
  state = jax.jit(t.make_state, out_shardings=t.state_shardings)(params, frozen)
  log.info("initialised from %s: %d parameters loaded, %d left at init, %d of the source unused "
           "(listed in %s)", config.init_from, len(report["loaded"]), len(report["left_at_init"]),
           len(report["unused"]), os.path.join(workdir, "init_from.json"))
  if report["left_at_init"]:
    log.warning("init_from: left at init: %s", ", ".join(report["left_at_init"][:20]))
  if is_main:
    with open(os.path.join(workdir, "init_from.json"), "w") as f:
      json.dump({"source": config.init_from, "pattern": config.init_from_pattern,
                 "into": config.init_from_into, **report}, f, indent=1)
  return state, frozen


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_at: int | None = None,
          devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
  """Trains (or resumes) to `config.total_steps`; returns the last logged metrics.

  `stop_at` ends this invocation early at that step, with a checkpoint, as an interruption would;
  the schedule still runs to `total_steps` when training is resumed. `devices` (default: all) are
  the mesh's devices, e.g. one of them for a single-device reference run.
  """
  devices = jax.devices() if devices is None else list(devices)
  config_lib.validate(config, num_devices=len(devices), num_processes=jax.process_count())
  workdir_lib.make(workdir)
  # One writer per workdir: a second run on it stops here, naming the holder (process 0 holds it).
  lock = lock_lib.WorkdirLock(workdir) if jax.process_index() == 0 else None
  if lock is not None:
    lock.acquire()
  try:
    return _train(config, workdir, stop_at, devices)
  finally:
    if lock is not None:
      lock.release()


def _train(config: ml_collections.ConfigDict, workdir: str, stop_at: int | None,
           devices: Sequence[jax.Device]) -> dict[str, Any]:
  # ---------------------------------------------------------------- config, mesh and system
  is_main = jax.process_index() == 0
  mesh = mesh_lib.make_mesh(dict(config.mesh), devices)
  system = systems.build(config, mesh, mesh_lib.config_rules(config))
  system.prepare(workdir)
  # The evaluation data is read and checked now (every file present and readable), so that a
  # broken eval set stops the run before it trains rather than at its final evaluation.
  evaluators = system.evaluators()

  t = build(config, system=system, mesh=mesh)
  rules, state_shardings, batch_sharding = t.rules, t.state_shardings, t.batch_sharding
  log.info("mesh %s, %d process(es), global batch %d", dict(mesh.shape), jax.process_count(),
           config.batch_size)
  log.info("model: %s parameters (%s trained)", f"{t.num_params:,}", f"{t.num_trainable:,}")

  # ---------------------------------------------------------------- data and checkpoint restore
  # This process reads the rows of each global batch that its devices hold (one global stream, so
  # the data does not depend on the number of processes).
  local_batch, block, blocks = mesh_lib.process_batch_block(batch_sharding, config.batch_size)
  data_it = system.train_data(local_batch, block, blocks)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
  frozen_store = ckpt_lib.FrozenStore(workdir)
  has_frozen = bool(jax.tree.leaves(t.frozen_abstract))
  target, frozen_target = t.shapes()
  # The newest checkpoint that reads and verifies (a corrupt one is moved aside, with one line).
  # Saved by another number of processes: the data stream is placed at global batch `start`.
  start, state = ckpt.restore_latest_good(
      target, data_it, resume_data=lambda fresh, step: stream.resume_state(
          fresh, step, local_batch))
  if start is not None:
    if has_frozen and not frozen_store.exists():
      raise ckpt_lib.CheckpointMismatchError(
          f"{ckpt.directory}/{start} has no frozen weights beside it ({frozen_store.directory} is "
          "missing): they were saved when the run started; restore that directory or start anew")
    frozen = frozen_store.restore(frozen_target) if has_frozen else {}
    log.info("resumed from step %d (%s)", start, ckpt.directory)
  elif config.init_from:
    # Fine-tuning: parameters from another run or an imported checkpoint, fresh optimizer state.
    start = 0
    state, frozen = _init_from(t, config, workdir, is_main)
  else:
    start = 0
    state, frozen = jax.jit(t.init, out_shardings=(state_shardings, t.frozen_shardings))(
        jax.random.key(config.seed))
  if start == 0:
    # The one check of the whole state's finiteness: from here on the step never applies a
    # non-finite update (nonfinite.guarded_update), and a restore checks every float array, so
    # the state is finite by construction and a save needs no pass over it.
    bad = verify.nonfinite_arrays(state)
    if bad:
      raise ckpt_lib.NonfiniteStateError(
          f"the initial state holds NaN or inf in {len(bad)} arrays (e.g. {bad[:3]}): check the "
          "model's init and init_from")
  if has_frozen and start == 0:
    # Once per run (a left-over of an attempt that saved no checkpoint is replaced): checkpoints
    # hold only what training changes.
    frozen_store.save(frozen)
  # Only now, with the checkpoint found to fit, does anything of this invocation reach the
  # workdir: a refused resume leaves it as it was.
  if is_main:
    workdir_lib.write_config(workdir, config, start)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)

  def latest_checkpoint() -> str:
    saved = ckpt.latest_step()
    return "none yet" if saved is None else os.path.join(ckpt.directory, str(saved))

  step_fn = t.step_fn
  predictor = evaluate.predictor_factory(system, mesh)

  def run_evals(step: int, final: bool) -> dict[str, float]:
    out = {}
    for name, ev in evaluators.items():
      if (final and ev.every == 0) or (ev.every and step % ev.every == 0):
        t0 = time.time()
        out.update(ev.run(predictor(merge_params(state["params"], frozen))))
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
      missing = sorted(set(t.batch_spec) - set(local))
      if missing:
        raise KeyError(f"step {step}: the training data lacks {missing} of the system's "
                       f"batch_spec (it has {sorted(local)})")
      # Only what batch_spec names goes to the devices (ids, masks of padding stay on the host).
      batch = _global_batch({k: local[k] for k in t.batch_spec}, batch_sharding)
      with jax.transfer_guard_host_to_device("disallow"):
        state, m = step_fn(state, frozen, batch)
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
          ckpt.save(step, state, data_it, known_finite=True)
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
  if nonfinite_steps.in_a_row and not stopped_early:
    ckpt.close()
    writer.close()
    raise nonfinite.NonfiniteError(
        f"the run ended inside a streak of {nonfinite_steps.in_a_row} non-finite steps (each "
        f"skipped): not done; the latest checkpoint {latest_checkpoint()} predates the streak. "
        "Lower optim.lr or check the data, then resume")
  summary = {**data_report.stats(data_it), "train/nonfinite_skipped": nonfinite_steps.total,
             "data/ids_sha256": data_report.ids_sha256(data_it),
             "params_sha256": params_sha256(merge_params(state["params"], frozen),
                                            state["extra"])}
  if not stopped_early:
    writer.write(config.total_steps, {**summary, "done": True})
  last.update(summary)
  ckpt.close()
  writer.close()
  return last
