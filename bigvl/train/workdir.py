"""A run's directory: made (or refused with one line) before anything runs, and its config.json
written only once the run is known to go ahead."""

from __future__ import annotations

import errno
import os

import ml_collections


class WorkdirError(OSError):
  """A workdir that cannot be used; the message says why and what to do."""


def make(workdir: str) -> None:
  """Creates `workdir` (and its parents) and checks that it can be written."""
  if "://" in workdir:
    return   # a bucket: orbax and the writers open it themselves
  try:
    os.makedirs(workdir, exist_ok=True)
  except PermissionError:
    raise WorkdirError(errno.EACCES, f"cannot create the workdir {workdir}: permission denied "
                       "(choose a directory you can write)") from None
  except OSError as e:
    raise WorkdirError(e.errno, f"cannot create the workdir {workdir}: {e.strerror}") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirError(errno.EACCES, f"the workdir {workdir} is read-only: make it writable or "
                       "choose another")


def write_config(workdir: str, config: ml_collections.ConfigDict, start: int) -> None:
  """Writes `workdir/config.json`. A resumed run (`start` > 0) whose config differs from the one
  there keeps the earlier one as `config.<start>.json`: what trained the steps up to `start`."""
  path = os.path.join(workdir, "config.json")
  body = config.to_json_best_effort(indent=2)
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
    if old == body:
      return
    if start:
      os.replace(path, os.path.join(workdir, f"config.{start}.json"))
  with open(path + ".tmp", "w") as f:
    f.write(body)
  os.replace(path + ".tmp", path)
