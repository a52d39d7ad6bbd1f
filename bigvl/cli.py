"""One-line errors for the launchers: an expected failure prints `<script>: <ErrorType>: <message>`
to stderr and exits 1; `--verbose` or BIGVL_VERBOSE=1 shows the full traceback instead.

  if __name__ == "__main__":
    cli.run_main(main, "eval.py", flags_parser=config_lib.flags_parser)

Expected failures are the ones whose message says what is wrong: ValueError (config errors,
checkpoint mismatches, unreadable files), OSError (a missing, unreadable or read-only path),
KeyboardInterrupt, WorkdirLocked, and the types a launcher adds with `expected=`; an error raised
from one of them (`raise X from e`) is reported as its cause. Anything else is a bug and keeps its
traceback. A full disk anywhere in an error's chain (an OSError with ENOSPC, or another library's
error that says so) is reported as one, naming the path and its free space, and the space needed
where a `needs_space` block said it. Unless verbose, logged errors lose their tracebacks (Orbax
logs one from each thread of a failed save) and the "Event loop is closed" noise that follows is
dropped. `check_writable` refuses an output path before any work.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import sys
from typing import Any, Callable, Iterator, NoReturn

from bigvl.train import lock as lock_lib

VERBOSE_ENV = "BIGVL_VERBOSE"
EXPECTED: tuple[type[BaseException], ...] = (ValueError, OSError, KeyboardInterrupt,
                                             lock_lib.WorkdirLocked)
_HINTS = {
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "check the path",
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "choose another path",
    errno.EEXIST: "choose another path or remove it",
}


class DiskFullError(OSError):
  """ENOSPC, with the path written to, the space left there and, if known, the space needed."""

  def __init__(self, path: str, needed: int | None = None, what: str = "the checkpoint"):
    super().__init__(errno.ENOSPC, disk_full_message(path, needed, what), path)

  def __str__(self) -> str:
    return self.strerror


def _size(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if n < 1024 or unit == "TiB":
      return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  raise AssertionError


def free_bytes(path: str) -> int | None:
  """Free space on the file system of `path` (or of its nearest existing parent)."""
  path = os.path.abspath(path)
  while True:
    try:
      return shutil.disk_usage(path).free
    except OSError:
      parent = os.path.dirname(path)
      if parent == path:
        return None
      path = parent


def check_writable(path: str, why: str = "") -> None:
  """Raises, before any work, if `path` (a directory to create or write in; remote paths are not
  checked) could not be written: its nearest existing parent is not a directory, is on a
  read-only file system, or is not writable. `why` is added to the message."""
  if "://" in path:
    return
  parent = os.path.abspath(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  why = f" ({why})" if why else ""
  if not os.path.isdir(parent):
    raise NotADirectoryError(errno.ENOTDIR, f"not a directory{why}", parent)
  if os.statvfs(parent).f_flag & os.ST_RDONLY:
    raise OSError(errno.EROFS, f"on a read-only file system{why}: choose another path", parent)
  if not os.access(parent, os.W_OK | os.X_OK):
    raise PermissionError(errno.EACCES, f"not writable{why}: check its permissions or choose "
                          "another path", parent)


def disk_full_message(path: str | None, needed: int | None = None,
                      what: str = "the checkpoint") -> str:
  if path is None:
    msg = "disk full: no space left on device"
  else:
    free = free_bytes(path) if "://" not in path else None
    msg = f"disk full at {path}: " + (f"{_size(free)} free" if free is not None else
                                      "no space left")
  if needed:
    msg += f", {what} needs about {_size(needed)}"
  return msg + ": free some space or choose another directory, then rerun"


def _chain(e: BaseException) -> Iterator[BaseException]:
  """`e`, its causes and contexts, and the members of exception groups among them."""
  seen, todo = set(), [e]
  while todo:
    x = todo.pop()
    if x is None or id(x) in seen:
      continue
    seen.add(id(x))
    yield x
    todo += [x.__cause__, x.__context__, *getattr(x, "exceptions", ())]


def _disk_full(e: BaseException) -> BaseException | None:
  """The ENOSPC in `e`'s chain that says most: a `DiskFullError`, else an OSError naming its
  path, else any OSError, else an error of another library (Rust's safetensors, TensorStore under
  Orbax) whose text says so."""
  def rank(x: BaseException) -> int | None:
    if isinstance(x, OSError):
      return None if x.errno != errno.ENOSPC else (
          0 if isinstance(x, DiskFullError) else 1 if x.filename else 2)
    return 3 if any(t in str(x) for t in ("No space left on device", "os error 28")) else None

  found = [(r, i, x) for i, x in enumerate(_chain(e)) if (r := rank(x)) is not None]
  return min(found, key=lambda t: t[:2])[2] if found else None


def is_disk_full(e: BaseException) -> bool:
  """ENOSPC anywhere in `e`'s chain (an OSError, or the text TensorStore or safetensors give)."""
  return _disk_full(e) is not None


def _path_in(text: str) -> str | None:
  """The first quoted absolute path in an error's text (TensorStore quotes what it failed on)."""
  m = re.search(r"""["'](/[^"']+)["']""", text)
  return m.group(1) if m else None


@contextlib.contextmanager
def needs_space(path: str, nbytes: int | None, what: str = "the checkpoint") -> Iterator[None]:
  """Turns a full disk inside the block (wherever in the exception chain) into a `DiskFullError`
  naming `path` and the `nbytes` the block needed."""
  try:
    yield
  except BaseException as e:
    if _disk_full(e) is None or isinstance(e, DiskFullError):
      raise
    raise DiskFullError(path, nbytes, what) from e


def _one_line(text: str) -> str:
  return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def message(e: BaseException) -> str:
  """What an expected failure says, on one line."""
  if isinstance(e, KeyboardInterrupt):
    return "interrupted (Ctrl-C or SIGINT)"
  if isinstance(e, DiskFullError):
    return e.strerror
  if e is _disk_full(e):
    return disk_full_message(str(e.filename) if isinstance(e, OSError) and e.filename else
                             _path_in(str(e)))
  if isinstance(e, OSError) and e.strerror:
    if e.filename is None:
      return _one_line(e.strerror)    # not "[Errno 13] ..."
    where = f"{e.filename} -> {e.filename2}" if e.filename2 else str(e.filename)
    # A message of one's own (not the C library's) says what to do itself.
    hint = _HINTS.get(e.errno) if e.strerror == os.strerror(e.errno) else None
    return _one_line(f"{where}: {e.strerror}" + (f": {hint}" if hint else ""))
  return _one_line(str(e)) or "(no message)"


def error_line(e: BaseException, script: str,
               expected: tuple[type[BaseException], ...] = ()) -> str | None:
  """`<script>: <ErrorType>: <message>` for an expected failure; None for anything else (a bug).
  A full disk anywhere in the chain is reported as one, and an unexpected error raised from an
  expected one (`raise X from e`) by its cause."""
  full = _disk_full(e)
  if full is not None:
    return f"{script}: {type(full).__name__}: {message(full)}"
  while not isinstance(e, EXPECTED + tuple(expected)):
    if e.__cause__ is None:
      return None
    e = e.__cause__
  return f"{script}: {type(e).__name__}: {message(e)}"


class _NoTraceback(logging.Filter):
  """Logs a record with an exception on one line, without the traceback."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info or record.exc_text or record.stack_info:
      record.msg = _one_line(record.getMessage()) + " (traceback: --verbose)"
      record.args = None
      record.exc_info = record.exc_text = record.stack_info = None
    return True


def _hide_background_tracebacks() -> None:
  """Unless verbose: a failed asynchronous save (Orbax) logs the error with its traceback from
  each of its threads, and TensorStore's callbacks then hit closed event loops by the dozen
  ("RuntimeError: Event loop is closed", reported as unraisable); both bury the one line that
  says what happened. Logged errors keep their line; the closed loops are dropped."""
  for handler in logging.getLogger().handlers:
    if not any(isinstance(f, _NoTraceback) for f in handler.filters):
      handler.addFilter(_NoTraceback())
  default = sys.unraisablehook

  def hook(u):
    if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
      default(u)
  sys.unraisablehook = hook


def verbose() -> bool:
  if os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes"):
    return True
  from absl import flags
  if "verbose" in flags.FLAGS and flags.FLAGS.is_parsed():
    return flags.FLAGS.verbose
  return any(a in ("--verbose", "--verbose=true", "--verbose=1") for a in sys.argv[1:])


def run_main(main: Callable[[list[str]], Any], script: str | None = None, *,
             flags_parser: Callable[[list[str]], list[str]] | None = None,
             expected: tuple[type[BaseException], ...] = ()) -> NoReturn:
  """absl's `app.run(main, flags_parser=...)` with one-line errors (see the module docstring).
  `script` names the launcher in the message (default: the basename of sys.argv[0])."""
  from absl import app, flags
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, f"Show the traceback of an error instead of one line "
                      f"(or set {VERBOSE_ENV}=1).")
  script = script or os.path.basename(sys.argv[0])

  def quiet_main(argv):
    if not verbose():
      _hide_background_tracebacks()
    return main(argv)

  try:
    app.run(quiet_main, **({"flags_parser": flags_parser} if flags_parser else {}))
  except (Exception, KeyboardInterrupt) as e:
    line = None if verbose() else error_line(e, script, expected)
    if line is None:
      raise
    print(line, file=sys.stderr, flush=True)
    sys.exit(1)
  raise AssertionError("app.run returned")
