"""One writer per workdir (bigvl.train.lock): refused while the holder lives, taken over once it
is gone, and never won twice by processes racing for a stale lock."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO
from bigvl.train import lock as lock_lib
from bigvl.train.lock import WorkdirLock, WorkdirLocked

# A process that takes the lock of argv[1] (at time argv[2], if given), says whether it got it,
# and holds it for argv[3] seconds.
HOLDER = f"""
import sys, time
sys.path.insert(0, {REPO!r})
from bigvl.train.lock import WorkdirLock, WorkdirLocked
if len(sys.argv) > 2:
  time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
try:
  WorkdirLock(sys.argv[1]).acquire()
except WorkdirLocked as e:
  print("lost", e, flush=True)
  sys.exit(0)
print("won", flush=True)
time.sleep(float(sys.argv[3]) if len(sys.argv) > 3 else 120)
"""


def _holder(workdir, *args):
  p = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir), *map(str, args)],
                       stdout=subprocess.PIPE, text=True)
  assert p.stdout.readline().strip() == "won"
  return p


def _lock_file(workdir) -> dict:
  with open(os.path.join(workdir, lock_lib.LOCK_FILE)) as f:
    return json.load(f)


def _write_lock(workdir, doc, age_s: float = 0.0):
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, lock_lib.LOCK_FILE)
  with open(path, "wb") as f:
    f.write(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
  if age_s:
    t = time.time() - age_s
    os.utime(path, (t, t))


def _dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_acquire_writes_the_holder_and_release_removes_it(tmp_path):
  wd = str(tmp_path / "run")                       # created by acquire
  lk = WorkdirLock(wd, argv=["train.py", "--workdir=run"]).acquire()
  assert lk.held and lk.acquire() is lk            # acquiring again is a no-op
  doc = _lock_file(wd)
  assert doc["host"] == socket.gethostname() and doc["pid"] == os.getpid()
  assert doc["argv"] == ["train.py", "--workdir=run"] and doc["started"]
  assert os.listdir(wd) == [lock_lib.LOCK_FILE]    # no temporary file left
  lk.release()
  assert not lk.held and os.listdir(wd) == []
  with WorkdirLock(wd) as again:
    assert again.held and os.path.exists(again.path)
  assert os.listdir(wd) == []


def test_a_live_holder_refuses_a_second_writer(tmp_path):
  p = _holder(tmp_path)
  try:
    with pytest.raises(WorkdirLocked) as e:
      WorkdirLock(str(tmp_path)).acquire()
    msg = str(e.value)
    assert f"pid {p.pid} on {socket.gethostname()}" in msg and "since " in msg, msg
    assert f"kill {p.pid}" in msg and "\n" not in msg, msg
    # The same process is no exception: a second lock object of its workdir is refused too.
    with WorkdirLock(str(tmp_path / "mine")):
      with pytest.raises(WorkdirLocked, match=f"pid {os.getpid()}"):
        WorkdirLock(str(tmp_path / "mine")).acquire()
  finally:
    p.kill()
    p.wait()


def test_the_lock_of_a_killed_holder_is_taken_over(tmp_path, caplog):
  p = _holder(tmp_path)
  p.send_signal(signal.SIGKILL)
  p.wait()
  with caplog.at_level(logging.WARNING, logger="bigvl"):
    lk = WorkdirLock(str(tmp_path)).acquire()
  assert _lock_file(tmp_path)["pid"] == os.getpid()
  (line,) = [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()]
  assert f"pid {p.pid} on {socket.gethostname()}" in line and "is gone" in line, line
  lk.release()


def test_a_recycled_pid_is_not_mistaken_for_the_holder(tmp_path, caplog):
  # This process is alive, but it is not the one that wrote the lock: it started at another time.
  doc = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2020-01-01T00:00:00",
         "proc_start": -1}
  _write_lock(tmp_path, doc)
  with caplog.at_level(logging.WARNING, logger="bigvl"):
    WorkdirLock(str(tmp_path)).acquire().release()
  assert any("is gone" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("garbage", [b"", b'{"host": "node-7", "pi', b"\x00\xff" * 40, b"[1, 2]",
                                     b'{"host": "x", "pid": 0}'])
def test_a_garbage_lock_file_is_taken_over(tmp_path, caplog, garbage):
  _write_lock(tmp_path, garbage, age_s=60)
  with caplog.at_level(logging.WARNING, logger="bigvl"):
    lk = WorkdirLock(str(tmp_path)).acquire()
  assert _lock_file(tmp_path)["pid"] == os.getpid()
  assert any("unreadable" in r.getMessage() for r in caplog.records)
  lk.release()


def test_a_young_unreadable_lock_is_given_time_to_be_written(tmp_path):
  # Where hard links are missing a lock is created, then written: an empty one just made may be
  # a live writer's, so it is only taken over once it has stayed unreadable a while.
  _write_lock(tmp_path, b"")
  t0 = time.monotonic()
  WorkdirLock(str(tmp_path)).acquire().release()
  assert time.monotonic() - t0 >= lock_lib._WRITE_GRACE_S * 0.5


def test_a_lock_of_another_host_is_refused(tmp_path):
  _write_lock(tmp_path, {"host": "elsewhere-node-3", "pid": 4242, "started": "2024-05-01T10:00:00"})
  with pytest.raises(WorkdirLocked) as e:
    WorkdirLock(str(tmp_path)).acquire()
  msg = str(e.value)
  assert "pid 4242 on elsewhere-node-3 (since 2024-05-01T10:00:00)" in msg, msg
  assert f"delete {tmp_path / lock_lib.LOCK_FILE}" in msg and "\n" not in msg, msg
  assert _lock_file(tmp_path)["host"] == "elsewhere-node-3"     # untouched


def test_release_leaves_someone_elses_lock(tmp_path, caplog):
  lk = WorkdirLock(str(tmp_path)).acquire()
  other = {"host": socket.gethostname(), "pid": 1, "started": "now", "token": "theirs"}
  _write_lock(tmp_path, other)                     # taken over meanwhile (we were presumed dead)
  with caplog.at_level(logging.WARNING, logger="bigvl"):
    lk.release()
  assert _lock_file(tmp_path) == other
  assert any("not removing" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("stale", ["dead", "garbage"])
def test_racing_takeovers_of_a_stale_lock_have_one_winner(tmp_path, stale):
  if stale == "dead":
    _write_lock(tmp_path, {"host": socket.gethostname(), "pid": _dead_pid(), "started": "then"})
  else:
    _write_lock(tmp_path, b'{"host": "nod', age_s=60)
  start = time.time() + 2.0                        # time for all of them to start and import
  procs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), str(start), "4"],
                            stdout=subprocess.PIPE, text=True) for _ in range(4)]
  lines = [p.stdout.readline().strip() for p in procs]
  for p in procs:
    p.kill()
    p.wait()
  winners = [p.pid for p, line in zip(procs, lines) if line == "won"]
  assert len(winners) == 1, lines
  losers = [line for line in lines if line != "won"]
  assert all(line.startswith("lost ") and f"pid {winners[0]} " in line for line in losers), lines


def test_remote_workdirs_get_no_lock(caplog):
  with caplog.at_level(logging.WARNING, logger="bigvl"):
    for _ in range(2):
      lk = WorkdirLock("gs://some-bucket/run-remote-test").acquire()
      lk.release()
  assert [r.getMessage() for r in caplog.records] == [
      "gs://some-bucket/run-remote-test is remote: it gets no lock, make sure only one run "
      "writes to it"]
