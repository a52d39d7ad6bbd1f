"""One writer per workdir: `<workdir>/.lock`, naming the process that holds it.

  with lock.WorkdirLock(workdir):        # or .acquire() ... .release()
    train(...)

The lock file is JSON {"host", "pid", "started", "argv", ...}. It is written whole to a temporary
file and hard-linked into place, so it appears atomically and complete, and only if no lock is
there (filesystems without hard links get O_CREAT|O_EXCL). A second acquire raises
`WorkdirLocked`, one line naming the holder, when the holder is alive on this host (its pid exists
and is the same process: its start time since boot matches, so a recycled pid is not mistaken for
it) or lives on another host, which cannot be checked from here. A lock whose holder is gone, or
that is unreadable, is stale: it is taken over with a warning. A takeover replaces the file by an
atomic rename while holding an flock on `<workdir>/.lock.takeover` and after checking again that
the lock it replaces is still the stale one, so of processes racing to take over one stale lock
exactly one wins (the others then find a live holder). The kernel drops an flock with its
process, so a takeover that dies half-way leaves nothing stale behind.

Remote workdirs ("gs://…", anything with "://") get no lock: their stores have neither hard links
nor flock; that is logged once.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
import uuid
from typing import Any

log = logging.getLogger("bigvl")

LOCK_FILE = ".lock"
TAKEOVER_FILE = ".lock.takeover"
# An unreadable lock younger than this may be one being written where hard links are missing
# (O_CREAT|O_EXCL, then the write): it is read again before being called stale.
_WRITE_GRACE_S = 2.0
_TAKEOVER_WAIT_S = 30.0
_remote_logged: set[str] = set()


class WorkdirLocked(RuntimeError):
  """Another process holds the workdir's lock (or may: it lives on another host)."""


def _boot_id() -> str | None:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
  """(state, start time in clock ticks since boot) of a process, from /proc; None if unknown."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      stat = f.read()
  except OSError:
    return None
  # "pid (comm) state ppid ...": comm may hold spaces and parentheses; field 22 is the start time.
  fields = stat[stat.rfind(")") + 2:].split()
  try:
    return fields[0], int(fields[19])
  except (IndexError, ValueError):
    return None


def _alive(holder: dict[str, Any]) -> bool:
  """Whether the process a lock of this host names still runs (and is the one that wrote it)."""
  pid = holder["pid"]
  if holder.get("boot_id") and _boot_id() and holder["boot_id"] != _boot_id():
    return False                       # written before the last reboot
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass                               # exists, another user's
  stat = _proc_stat(pid)
  if stat is None:
    return True
  state, start = stat
  if state in ("Z", "X"):
    return False                       # exited, not yet reaped
  return holder.get("proc_start") in (None, start)


def _write_new(path: str, body: bytes) -> None:
  """Creates `path` (FileExistsError if it is there) holding `body`, on disk."""
  fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  try:
    os.write(fd, body)
    os.fsync(fd)
  finally:
    os.close(fd)


def _describe(holder: dict[str, Any]) -> str:
  return f"pid {holder['pid']} on {holder['host']} (since {holder.get('started', '?')})"


def _parse(raw: bytes) -> tuple[dict[str, Any] | None, str]:
  """The holder a lock file names, or None and why it is unreadable."""
  try:
    holder = json.loads(raw.decode())
  except (UnicodeDecodeError, ValueError) as e:
    return None, f"not JSON ({e})" if raw.strip() else "empty"
  if not isinstance(holder, dict):
    return None, f"holds a {type(holder).__name__}, not an object"
  pid, host = holder.get("pid"), holder.get("host")
  if type(pid) is not int or pid <= 0 or not isinstance(host, str) or not host:
    return None, "no valid pid and host"
  return holder, ""


class WorkdirLock:
  """The lock of one workdir; see the module's docstring. Not reentrant across objects: a second
  `WorkdirLock` of the same workdir in the same process is refused like any other process."""

  def __init__(self, workdir: str, argv: list[str] | None = None):
    self.workdir = workdir
    self.remote = "://" in workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self.argv = list(sys.argv if argv is None else argv)
    self.token: str | None = None      # set while held

  @property
  def held(self) -> bool:
    return self.token is not None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()

  # ------------------------------------------------------------------ acquire

  def acquire(self) -> WorkdirLock:
    """Takes the lock (a no-op if this object holds it, or for a remote workdir); raises
    `WorkdirLocked` when a live or unverifiable holder has it."""
    if self.held:
      return self
    if self.remote:
      if self.workdir not in _remote_logged:
        _remote_logged.add(self.workdir)
        log.warning("%s is remote: it gets no lock, make sure only one run writes to it",
                    self.workdir)
      return self
    os.makedirs(self.workdir, exist_ok=True)
    token = uuid.uuid4().hex
    body = self._body(token)
    deadline = time.monotonic() + _TAKEOVER_WAIT_S
    while True:
      if time.monotonic() > deadline:
        raise WorkdirLocked(f"{self.path} keeps changing hands: is another run starting on "
                            f"{self.workdir}? Try again")
      if self._create(body):
        self.token = token
        return self
      raw = self._read()
      if raw is None:
        continue                       # released meanwhile: try again
      stale = self._stale_reason(raw)
      if stale is None:
        continue                       # replaced while we looked: judge the new one
      if self._take_over(raw, body, stale):
        self.token = token
        return self

  def _body(self, token: str) -> bytes:
    stat = _proc_stat(os.getpid())
    return json.dumps({
        "host": socket.gethostname(), "pid": os.getpid(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "argv": self.argv, "token": token,
        "proc_start": stat[1] if stat else None, "boot_id": _boot_id(),
    }).encode()

  def _temp(self, body: bytes) -> str:
    """A fresh, complete copy of `body` beside the lock (its name unique to this attempt)."""
    tmp = f"{self.path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    _write_new(tmp, body)
    return tmp

  def _create(self, body: bytes) -> bool:
    """Puts the lock in place if there is none; False if there is one."""
    tmp = self._temp(body)
    try:
      os.link(tmp, self.path)
      return True
    except FileExistsError:
      return False
    except OSError as e:
      if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
        raise
    finally:
      os.unlink(tmp)
    # No hard links here: create and write (a reader allows for the moment between the two).
    try:
      _write_new(self.path, body)
    except FileExistsError:
      return False
    return True

  def _read(self) -> bytes | None:
    try:
      with open(self.path, "rb") as f:
        return f.read()
    except FileNotFoundError:
      return None

  def _stale_reason(self, raw: bytes) -> str | None:
    """Why the lock holding `raw` may be taken over; raises `WorkdirLocked` if it may not, None
    if the file changed while an unreadable one was given time to be completed."""
    holder, why = _parse(raw)
    if holder is None:
      try:
        age = time.time() - os.stat(self.path).st_mtime
      except FileNotFoundError:
        return None
      if age < _WRITE_GRACE_S:
        time.sleep(0.1)
        return None
      return f"it is unreadable ({why}), a stale lock"
    if holder["host"] != socket.gethostname():
      raise WorkdirLocked(
          f"{self.workdir} is locked by {_describe(holder)}, another host, which cannot be checked "
          f"from {socket.gethostname()}: if that run is gone, delete {self.path} and rerun")
    if _alive(holder):
      raise WorkdirLocked(
          f"{self.workdir} is in use by {_describe(holder)}: wait for that run to end or stop it "
          f"(kill {holder['pid']}), or use another workdir")
    return f"its holder, {_describe(holder)}, is gone"

  def _take_over(self, stale: bytes, body: bytes, why: str) -> bool:
    """Replaces the lock if it still holds `stale`; False if it changed meanwhile."""
    fd = os.open(os.path.join(self.workdir, TAKEOVER_FILE), os.O_CREAT | os.O_RDWR, 0o644)
    try:
      self._flock(fd)
      # Under the flock no one else replaces the lock, and a fresh lock is only ever created
      # where there is none: if it still holds `stale`, it is ours to replace.
      if self._read() != stale:
        return False
      tmp = self._temp(body)
      try:
        os.rename(tmp, self.path)
      except BaseException:
        os.unlink(tmp)
        raise
    finally:
      os.close(fd)                     # drops the flock
    log.warning("taking over the lock %s: %s", self.path, why)
    return True

  # ------------------------------------------------------------------ release

  def release(self) -> None:
    """Removes the lock if it is still this object's (a lock taken over meanwhile is left)."""
    if not self.held:
      return
    token, self.token = self.token, None
    raw = self._read()
    holder = _parse(raw)[0] if raw is not None else None
    if holder is None or holder.get("token") != token:
      log.warning("not removing %s: it is no longer this process's lock (%s)", self.path,
                  _describe(holder) if holder else "gone or unreadable")
      return
    try:
      os.unlink(self.path)
    except FileNotFoundError:
      pass

  def _flock(self, fd: int) -> None:
    deadline = time.monotonic() + _TAKEOVER_WAIT_S
    while True:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
      except BlockingIOError:
        if time.monotonic() > deadline:
          raise WorkdirLocked(f"another process has been taking over {self.path} for "
                              f"{_TAKEOVER_WAIT_S:.0f}s: try again") from None
        time.sleep(0.05)
      except OSError as e:
        raise WorkdirLocked(
            f"{self.path} is stale but this filesystem cannot lock files to take it over safely "
            f"({e.strerror}): delete it and rerun") from e

