"""Orbax checkpoints of the train state together with the data iterator's position.

Saves are atomic: orbax writes into a temporary directory, writes `commit_success.txt` into it and
renames it when complete, so an interrupted save is never picked up by `latest_step`. A step directory
without that marker (a copy cut short, a filesystem without atomic rename) is moved aside as
`<step>.incomplete-<time>` when the Checkpointer opens, and orbax's leftover temporary directories are
removed. Restoring into a state of another shape is refused with an error that names the first
mismatching parameter.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from typing import Any, Callable

from etils import epath
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from bigvl.export import params_io
from bigvl import cli
from bigvl.train import verify

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


VERIFY_FORMAT = "bigvl.verify/2"    # file digests (DIGESTS_PREFIX<process>.json in each step)
VERIFY_FORMAT_ARRAYS = "bigvl.verify/1"   # per-array fingerprints (bigvl before file digests)
DIGESTS_PREFIX = "digests.process_"
VERIFY_SUFFIX = ".verify.json"   # beside the frozen weights


class CorruptCheckpointError(RuntimeError):
  """A checkpoint that cannot be read, or whose arrays or data position fail verification."""


class NoGoodCheckpointError(RuntimeError):
  """Every checkpoint of a run is corrupt: the run stops rather than start afresh over them."""


class NonfiniteStateError(RuntimeError):
  """A train state with NaN or inf values: it is never saved."""


class DiskFullError(cli.DiskFullError):
  """No space left for a checkpoint; the message names the directory and the space needed."""

  def __init__(self, message: str, path: str):
    OSError.__init__(self, errno.ENOSPC, message, path)


def _first_line(e: BaseException, limit: int = 160) -> str:
  first = str(e).strip().splitlines()[0] if str(e).strip() else ""
  return f"{type(e).__name__}: " + (first[:limit] + "…" if len(first) > limit else first)


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
             for f in files)


def _gather_digests(digest: str) -> list[str]:
  """Every process's hex digest, in process order (one per process)."""
  if jax.process_count() == 1:
    return [digest]
  from jax.experimental import multihost_utils
  mine = np.frombuffer(bytes.fromhex(digest), np.uint8)
  return [bytes(row).hex() for row in np.asarray(multihost_utils.process_allgather(mine))]


def _all_agree(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.asarray(multihost_utils.process_allgather(np.array([ok]))).all())


def _verify_data_file(path: str, record: dict[str, Any], step: int,
                      index: int | None = None) -> None:
  """A process's data position file (default: this one's) against the digest saved with it."""
  index = jax.process_index() if index is None else index
  try:
    with open(path) as f:
      state = json.loads(f.read())
  except FileNotFoundError:
    raise CorruptCheckpointError(f"its data position {os.path.basename(path)} is missing") from None
  except (OSError, ValueError) as e:
    raise CorruptCheckpointError(f"its data position {os.path.basename(path)} cannot be read "
                                 f"({type(e).__name__})") from None
  want = record.get("data", [])[index:index + 1]
  if not want or verify.json_digest(state) != want[0]:
    raise CorruptCheckpointError(f"its data position {os.path.basename(path)} differs from what "
                                 "was saved")


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with items `state` (pytree) and `data` (grain)."""

  def __init__(self, directory: str, *, keep: int = 3, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    if jax.process_index() == 0 and not read_only:
      set_aside_incomplete(self.directory)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("bigvl_incomplete_checkpoints_set_aside")
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, enable_async_checkpointing=False,
            cleanup_tmp_directories=not read_only, read_only=read_only),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "verify": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any | None = None, *,
           known_finite: bool = False) -> None:
    """Saves `state` (and the data position) as `step`, then the digests restore verifies.

    A state holding a NaN or an infinity is never written (NonfiniteStateError): it is checked here
    unless the caller knows it is finite (`known_finite`: the train loop's state is, by
    construction). A save the disk cannot hold raises DiskFullError naming the directory and the
    space it needs, and leaves the older checkpoints as they were.
    """
    bad = [] if known_finite else verify.nonfinite_arrays(state)
    if bad:
      raise NonfiniteStateError(
          f"step {step}: not saved: {len(bad)} arrays hold NaN or inf (e.g. {bad[:3]}); the "
          f"latest checkpoint is still {self.latest_step()}")
    record = {"format": VERIFY_FORMAT, "process_count": jax.process_count()}
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
      record["data"] = _gather_digests(verify.json_digest(data_iterator.get_state()))
    items["verify"] = ocp.args.JsonSave(record)
    try:
      self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
      self._mngr.wait_until_finished()
      self._write_digests(step)
    except Exception as e:  # tensorstore reports ENOSPC as a ValueError; orbax may wrap it
      if cli.is_disk_full(e):
        raise DiskFullError(self._disk_full_message(step), self.directory) from e
      raise

  def _write_digests(self, step: int) -> None:
    """Each process digests the files it wrote into `step` (now committed) and records them; a
    step whose digests are missing (a kill in between) is treated as corrupt on restore."""
    root = os.path.join(self.directory, str(step))
    me = jax.process_index()
    files = verify.list_files(root, owner=me, skip=(DIGESTS_PREFIX,))
    out = {"format": VERIFY_FORMAT, "step": step, "process": me,
           "files": verify.digest_files(root, files)}
    path = os.path.join(root, f"{DIGESTS_PREFIX}{me}.json")
    with open(path + ".tmp", "w") as f:
      json.dump(out, f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"bigvl_digests_{step}")

  def _check_digests(self, step: int, record: dict[str, Any], processes: list[int]) -> None:
    """The files of `step` written by `processes` against the digests recorded after the save."""
    root = os.path.join(self.directory, str(step))
    for p in processes:
      path = os.path.join(root, f"{DIGESTS_PREFIX}{p}.json")
      try:
        with open(path) as f:
          saved = json.load(f)["files"]
      except FileNotFoundError:
        raise CorruptCheckpointError(
            f"the digests of process {p}'s files are missing (the save was cut short after its "
            "commit, or the file was deleted)") from None
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"the digests of process {p}'s files cannot be read "
                                     f"({type(e).__name__})") from None
      problems = verify.check_files(root, saved)
      if problems:
        raise CorruptCheckpointError(f"{len(problems)} files differ from what was saved "
                                     f"({'; '.join(problems[:2])})")

  def _disk_full_message(self, step: int) -> str:
    free = shutil.disk_usage(self.directory).free
    previous = [d for d in self.all_steps() if d != step]
    need = _dir_bytes(os.path.join(self.directory, str(max(previous)))) if previous else 0
    return (f"disk full saving step {step} in {self.directory}: {free / 2**20:.1f} MiB free, a "
            f"checkpoint needs about {need / 2**20:.1f} MiB"
            + (f"; step {max(previous)} is intact" if previous else "")
            + ": free space (or lower keep_checkpoints) and run the same command to resume")

  def _check_compatible(self, step: int, abstract_state: Any) -> None:
    try:
      saved = self._mngr.item_metadata(step)["state"]
      saved_leaves = {_path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(saved)}
    except Exception as e:
      raise CorruptCheckpointError(f"its metadata cannot be read ({_first_line(e)})") from e
    if not saved_leaves:
      raise CorruptCheckpointError("its metadata lists no arrays")
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

  def _record(self, step: int) -> dict[str, Any] | None:
    """The fingerprints saved with `step`, or None for a checkpoint from before they existed."""
    path = os.path.join(self.directory, str(step), "verify")
    if not os.path.exists(path):
      if any(f.startswith(DIGESTS_PREFIX) for f in os.listdir(os.path.dirname(path))):
        raise CorruptCheckpointError("its verification record verify/ is missing")
      return None
    try:
      record = self._mngr.restore(step, args=ocp.args.Composite(
          verify=ocp.args.JsonRestore()))["verify"]
    except Exception as e:
      raise CorruptCheckpointError(f"its fingerprints cannot be read ({type(e).__name__})") from e
    if not isinstance(record, dict) or record.get("format") not in (VERIFY_FORMAT,
                                                                    VERIFY_FORMAT_ARRAYS):
      raise CorruptCheckpointError("its fingerprints are not in a format this bigvl writes")
    return record

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None, *,
              resume_data: Callable[[Any, int], Any] | None = None) -> Any:
    """Restores into the shardings of `abstract_state` (a pytree of jax.ShapeDtypeStruct) and
    verifies what was read against the fingerprints saved with it.

    The arrays restore onto any mesh and number of processes. The data position is saved per
    process; when the checkpoint was written by another number of processes,
    `resume_data(fresh iterator state, step) -> state` places the iterator instead. Raises
    CheckpointMismatchError for a checkpoint of another model (nothing is wrong with it) and
    CorruptCheckpointError for one that cannot be read or fails verification.
    """
    record = self._record(step)
    saved_count = record["process_count"] if record else None
    if record and record["format"] == VERIFY_FORMAT:   # before reading a byte of the arrays
      self._check_digests(step, record, [p for p in range(saved_count)
                                         if p % jax.process_count() == jax.process_index()])
    self._check_compatible(step, abstract_state)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    own_data = os.path.join(self.directory, str(step), "data",
                            f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    if saved_count is None:   # unverified: infer another process count from the missing file
      moved = (data_iterator is not None and resume_data is not None
               and not os.path.exists(own_data))
    else:
      moved = data_iterator is not None and resume_data is not None and (
          saved_count != jax.process_count())
      if data_iterator is not None and not moved:
        _verify_data_file(own_data, record, step)
    if data_iterator is not None and not moved:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
    except CheckpointMismatchError:
      raise
    except Exception as e:  # a truncated, deleted or garbage file: orbax and tensorstore vary
      raise CorruptCheckpointError(f"it cannot be read ({_first_line(e)})") from e
    state = restored["state"]
    if record is None:
      log.warning("checkpoint step %d was saved without fingerprints (an older bigvl): not "
                  "verified", step)
    elif record["format"] == VERIFY_FORMAT:
      bad = verify.nonfinite_arrays(state)
      if bad:
        raise CorruptCheckpointError(f"{len(bad)} arrays hold NaN or inf ({'; '.join(bad[:2])})")
    else:
      prints = verify.fingerprints(state)
      diff = verify.compare(record["arrays"], prints)
      bad = verify.nonfinite(prints)
      if diff or bad:
        what = diff[:2] + [f"{k}: NaN or inf" for k in bad[:2]]
        raise CorruptCheckpointError(
            f"{len(diff)} arrays differ from what was saved, {len(bad)} hold NaN or inf "
            f"({'; '.join(what)})")
    if moved:
      log.warning("checkpoint step %d has no data position for process %d of %d (another number "
                  "of processes wrote it): placing the data stream by its global position", step,
                  jax.process_index(), jax.process_count())
      data_iterator.set_state(resume_data(data_iterator.get_state(), step))
    return state

  def verify_step(self, step: int, abstract_state: Any) -> list[str]:
    """What is wrong with checkpoint `step` (nothing: []), changing nothing: its metadata against
    `abstract_state`, every process's files against their digests (or, for a checkpoint of format 1,
    its arrays against their fingerprints), finiteness, every process's data position."""
    try:
      record = self._record(step)
      if record is not None and record["format"] == VERIFY_FORMAT:   # first: names the file
        self._check_digests(step, record, list(range(record["process_count"])))
      self._check_compatible(step, abstract_state)
      if record is None:
        return ["saved without fingerprints (an older bigvl): cannot be verified"]
      for i in range(record["process_count"]):
        path = os.path.join(self.directory, str(step), "data",
                            f"process_{i}-of-{record['process_count']}.json")
        if "data" in record:
          _verify_data_file(path, record, step, index=i)
      self.restore(step, abstract_state)
    except (CorruptCheckpointError, CheckpointMismatchError) as e:
      return [str(e)]
    return []

  def restore_latest_good(self, abstract_state: Any, data_iterator: Any | None = None, *,
                          resume_data: Callable[[Any, int], Any] | None = None
                          ) -> tuple[int | None, Any]:
    """(step, state) of the newest checkpoint that reads and verifies, or (None, None) when there
    is none at all. A bad one is moved aside as `<step>.corrupt-<time>` with one line saying why,
    and the next older one is tried; when every one is bad, NoGoodCheckpointError (never a silent
    fresh start over a run's checkpoints). Every process agrees on each verdict."""
    bad = []
    for step in sorted(self.all_steps(), reverse=True):
      why = None
      try:
        state = self.restore(step, abstract_state, data_iterator, resume_data=resume_data)
      except CorruptCheckpointError as e:
        why, state = str(e), None
      if _all_agree(why is None):
        return step, state
      aside = self.set_aside_corrupt(step, why or "another process could not verify it")
      bad.append(f"{step} ({aside})")
    if bad:
      raise NoGoodCheckpointError(
          f"no checkpoint in {self.directory} reads and verifies: {', '.join(bad)} moved aside "
          "(the warnings above say why); restore a good copy, or start in another workdir")
    return None, None

  def set_aside_corrupt(self, step: int, why: str) -> str:
    src = os.path.join(self.directory, str(step))
    aside = f"{step}.corrupt-{time.time_ns()}"
    if jax.process_index() == 0:
      os.rename(src, os.path.join(self.directory, aside))
      log.warning("checkpoint %s is corrupt: %s; moved aside as %s", src, why, aside)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"bigvl_corrupt_{step}_set_aside")
    self._mngr.reload()
    return aside

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
    prints = verify.fingerprints(frozen)
    bad = verify.nonfinite(prints)
    if bad:
      raise NonfiniteStateError(f"frozen weights not saved: {len(bad)} arrays hold NaN or inf "
                                f"(e.g. {bad[:3]})")
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(epath.Path(self.directory), frozen, force=True)
    ckptr.wait_until_finished()
    ckptr.close()
    if jax.process_index() == 0:
      tmp = self.directory + VERIFY_SUFFIX + ".tmp"
      with open(tmp, "w") as f:
        json.dump({"format": VERIFY_FORMAT, "arrays": prints}, f)
      os.replace(tmp, self.directory + VERIFY_SUFFIX)

  def restore(self, abstract: Any) -> Any:
    ckptr = ocp.StandardCheckpointer()
    try:
      saved = ckptr.metadata(epath.Path(self.directory)).item_metadata
      got = {_path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(saved)}
    except Exception as e:
      raise CorruptCheckpointError(f"the frozen weights in {self.directory} cannot be read "
                                   f"({type(e).__name__})") from e
    want = {_path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(abstract)}
    bad = sorted(k for k in set(want) | set(got)
                 if k not in want or k not in got or tuple(want[k].shape) != tuple(got[k].shape))
    if bad:
      raise CheckpointMismatchError(
          f"{self.directory} holds other frozen weights than the config's model ({len(bad)} "
          f"differ, e.g. {bad[:3]}): is this workdir from another model?")
    try:
      restored = ckptr.restore(epath.Path(self.directory), abstract)
      with open(self.directory + VERIFY_SUFFIX) as f:
        record = json.load(f)
    except Exception as e:
      raise CorruptCheckpointError(f"the frozen weights in {self.directory} cannot be read "
                                   f"({type(e).__name__})") from e
    finally:
      ckptr.close()
    prints = verify.fingerprints(restored)
    diff = verify.compare(record.get("arrays", {}), prints) + verify.nonfinite(prints)
    if diff:
      raise CorruptCheckpointError(f"the frozen weights in {self.directory} fail verification "
                                   f"({'; '.join(diff[:2])}); they are saved once per run: "
                                   "restore them from a copy, or start in another workdir")
    return restored
