"""Orbax checkpoints of the train state together with the data iterator's position.

Saves are atomic: orbax writes into a temporary directory, writes `commit_success.txt` into it and
renames it when complete, so an interrupted save is never picked up by `latest_step`. A step directory
without that marker (a copy cut short, a filesystem without atomic rename) is moved aside as
`<step>.incomplete-<time>` when the Checkpointer opens, and orbax's leftover temporary directories are
removed. Restoring into a state of another shape is refused with an error that names the first
mismatching parameter.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

from etils import epath
import grain
import jax
import orbax.checkpoint as ocp

from bigvl.export import params_io

log = logging.getLogger("bigvl")


# Defined beside the parameter directories it is also raised for; re-exported for the loop's users.
CheckpointMismatchError = params_io.CheckpointMismatchError


def _path_str(path) -> str:
  # Dict keys, sequence indices and namedtuple fields all print as plain names, so that a tree read
  # back from checkpoint metadata (dicts and lists) lines up with the live one (namedtuples).
  def name(k):
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return "/".join(name(k) for k in path)


COMMIT_MARKER = "commit_success.txt"  # orbax writes it last, before the rename


def set_aside_incomplete(directory: str) -> list[str]:
  """Moves step directories without the commit marker out of resume's way; returns their names."""
  root = epath.Path(directory)
  if not root.exists():
    return []
  moved = []
  for d in sorted(root.iterdir()):
    if d.name.isdigit() and d.is_dir() and not (d / COMMIT_MARKER).exists():
      aside = d.parent / f"{d.name}.incomplete-{time.time_ns()}"
      log.warning("checkpoint %s was not completely saved; moved to %s", d, aside.name)
      d.rename(aside)
      moved.append(d.name)
  return moved


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with items `state` (pytree) and `data` (grain)."""

  def __init__(self, directory: str, *, keep: int = 3):
    self.directory = os.path.abspath(directory)
    if jax.process_index() == 0:
      set_aside_incomplete(self.directory)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("bigvl_incomplete_checkpoints_set_aside")
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False,
            cleanup_tmp_directories=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any | None = None) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
    self._mngr.wait_until_finished()

  def _check_compatible(self, step: int, abstract_state: Any) -> None:
    saved = self._mngr.item_metadata(step)["state"]
    saved_leaves = {_path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(saved)}
    want_leaves = {_path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(abstract_state)}
    for name, want in want_leaves.items():
      got = saved_leaves.get(name)
      if got is None:
        raise CheckpointMismatchError(
            f"checkpoint step {step} in {self.directory} has no parameter {name!r} "
            f"(the config's model has it); is this checkpoint from another model?")
      if tuple(got.shape) != tuple(want.shape):
        raise CheckpointMismatchError(
            f"checkpoint step {step}: parameter {name!r} has shape {tuple(got.shape)}, the config's "
            f"model wants {tuple(want.shape)}")
    extra = sorted(set(saved_leaves) - set(want_leaves))
    if extra:
      raise CheckpointMismatchError(
          f"checkpoint step {step} has parameter {extra[0]!r} that the config's model lacks "
          f"({len(extra)} such)")

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None, *,
              resume_data: Callable[[Any], Any] | None = None) -> Any:
    """Restores into the shardings of `abstract_state` (a pytree of jax.ShapeDtypeStruct).

    The arrays restore onto any mesh and number of processes. The data position is saved per
    process; when the checkpoint has none for this process (it was written by another number of
    processes), `resume_data(fresh iterator state) -> state` places the iterator instead.
    """
    self._check_compatible(step, abstract_state)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    own_data = os.path.join(self.directory, str(step), "data",
                            f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    moved = (data_iterator is not None and resume_data is not None
             and not os.path.exists(own_data))
    if data_iterator is not None and not moved:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
    if moved:
      log.warning("checkpoint step %d has no data position for process %d of %d (another number "
                  "of processes wrote it): placing the data stream by its global position", step,
                  jax.process_index(), jax.process_count())
      data_iterator.set_state(resume_data(data_iterator.get_state()))
    return restored["state"]

  def close(self) -> None:
    self._mngr.close()


class FrozenStore:
  """The frozen (untrained) weights of a run, saved once beside its checkpoints, not in each one.

  `directory` is `<workdir>/frozen`; orbax writes it atomically (a temporary name, renamed when
  complete). A resumed run reads them from here, so it never depends on `init_from` still being
  where it was.
  """

  def __init__(self, workdir: str):
    self.directory = os.path.join(os.path.abspath(workdir), params_io.FROZEN_DIR)

  def exists(self) -> bool:
    return os.path.isdir(self.directory)

  def save(self, frozen: Any) -> None:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(epath.Path(self.directory), frozen, force=True)
    ckptr.wait_until_finished()
    ckptr.close()

  def restore(self, abstract: Any) -> Any:
    ckptr = ocp.StandardCheckpointer()
    saved = ckptr.metadata(epath.Path(self.directory)).item_metadata
    want = {_path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(abstract)}
    got = {_path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(saved)}
    bad = sorted(k for k in set(want) | set(got)
                 if k not in want or k not in got or tuple(want[k].shape) != tuple(got[k].shape))
    if bad:
      raise CheckpointMismatchError(
          f"{self.directory} holds other frozen weights than the config's model ({len(bad)} "
          f"differ, e.g. {bad[:3]}): is this workdir from another model?")
    restored = ckptr.restore(epath.Path(self.directory), abstract)
    ckptr.close()
    return restored
