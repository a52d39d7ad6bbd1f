"""Checkpoints a user can trust: verified on restore with a fallback to the last good one, no NaN
ever saved, a refused resume that changes nothing, a full disk that loses nothing."""

import glob
import json
import re
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, small_config

TOTAL, EVERY, STOP = 8, 2, 6   # checkpoints 2, 4, 6 when stopped at 6; the last good before 6 is 4


def _cfg(world, **kw):
  off = {f"evals.{name}.source": "" for name in ("zeroshot", "zeroshot_all", "retrieval")}
  return small_config(world, total_steps=TOTAL, checkpoint_every=EVERY, **{**off, **kw})


@pytest.fixture(scope="module")
def runs(tiny_world, tmp_path_factory):
  """An uninterrupted run, and one stopped at step 6 (copied by each test)."""
  from bigvl.train import loop
  root = tmp_path_factory.mktemp("trust")
  straight = loop.train(_cfg(tiny_world), str(root / "straight"))
  loop.train(_cfg(tiny_world), str(root / "stopped"), stop_at=STOP)
  return straight, str(root / "stopped")


def _largest(step_dir):
  """The largest data file a restore reads: in OCDBT's root `d/` when the save merged the
  processes' databases there (their `ocdbt.process_*` copies are then not read back, and bytes
  changed in them change nothing), else in the processes' own."""
  files = (glob.glob(os.path.join(step_dir, "state", "d", "*"))
           or glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*")))
  return max(files, key=os.path.getsize)


def _overwrite_middle(path, data):
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.seek(max(0, size // 2 - len(data) // 2))
    f.write(data)


def _flip(path, n=8):
  rng = np.random.default_rng(0)
  with open(path, "r+b") as f:
    raw = bytearray(f.read())
    for i in rng.choice(len(raw) // 2, n, replace=False) + len(raw) // 4:
      raw[i] ^= 0xFF
    f.seek(0)
    f.write(raw)


def _data_json(step_dir):
  return glob.glob(os.path.join(step_dir, "data", "process_0-of-1.json"))[0]


CORRUPTIONS = {
    "random_4k_mid_file": lambda d: _overwrite_middle(_largest(d),
                                                      np.random.default_rng(1).bytes(4096)),
    "flipped_bytes": lambda d: _flip(_largest(d)),
    "truncated_data_file": lambda d: os.truncate(_largest(d), os.path.getsize(_largest(d)) // 2),
    "deleted_data_file": lambda d: os.remove(_largest(d)),
    "garbage_manifest": lambda d: open(os.path.join(d, "state", "manifest.ocdbt"), "wb").write(
        b"garbage" * 100),
    "deleted_metadata": lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
    "garbage_iterator_state": lambda d: open(_data_json(d), "w").write("{not json"),
    "deleted_iterator_state": lambda d: os.remove(_data_json(d)),
    "deleted_digests": lambda d: os.remove(os.path.join(d, "digests.process_0.json")),
}


# A resumed run to the end for these (the data position is part of what must come back); the others
# restore the state alone, which is what decides the digest (the run's determinism is shown here).
END_TO_END = ("random_4k_mid_file", "garbage_iterator_state", "deleted_iterator_state")


@pytest.mark.parametrize("kind", END_TO_END)
def test_a_corrupt_checkpoint_falls_back_to_the_last_good_one(runs, tiny_world, tmp_path, kind,
                                                               caplog):
  from bigvl.train import loop
  straight, stopped = runs
  wd = str(tmp_path / "run")
  shutil.copytree(stopped, wd)
  CORRUPTIONS[kind](os.path.join(wd, "checkpoints", str(STOP)))
  with caplog.at_level(logging.INFO, logger="bigvl"):
    out = loop.train(_cfg(tiny_world), wd)
  said = [r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage()]
  assert len(said) == 1 and f"checkpoints/{STOP} is corrupt" in said[0], said
  assert len(said[0].splitlines()) == 1
  assert [d for d in os.listdir(os.path.join(wd, "checkpoints")) if ".corrupt-" in d]
  resumed = [r for r in caplog.records if "resumed from step" in r.getMessage()]
  assert "resumed from step 4" in resumed[0].getMessage()
  assert out["params_sha256"] == straight["params_sha256"], kind
  assert out["data/ids_sha256"] == straight["data/ids_sha256"], kind


@pytest.fixture(scope="module")
def target(runs, tiny_world):
  """The restore target of the stopped run, as `evaluate.verify_run` builds it (the run's own
  tokenizer fixes the vocabulary)."""
  from bigvl import systems
  from bigvl.parallel import mesh as mesh_lib
  from bigvl.train import loop
  config = _cfg(tiny_world)
  mesh = mesh_lib.make_mesh(dict(config.mesh))
  system = systems.build(config, mesh, mesh_lib.config_rules(config))
  system.prepare_for_checkpoint(runs[1])
  return loop.build(config, system=system).shapes()[0]


@pytest.mark.parametrize("kind", sorted(set(CORRUPTIONS) - set(END_TO_END)))
def test_a_corrupt_state_falls_back_to_the_last_good_one(runs, target, tmp_path, kind, caplog):
  """Every other corruption, at the restore that decides a resumed run: step 6 is named in one
  line and moved aside, and what comes back is step 4, byte for byte."""
  import jax
  from bigvl.train import checkpoint
  _, stopped = runs
  wd = str(tmp_path / "ck")
  shutil.copytree(os.path.join(stopped, "checkpoints"), wd)
  good = checkpoint.Checkpointer(os.path.join(stopped, "checkpoints"), read_only=True)
  want = jax.device_get(good.restore(4, target))
  good.close()
  CORRUPTIONS[kind](os.path.join(wd, str(STOP)))
  ck = checkpoint.Checkpointer(wd)
  with caplog.at_level(logging.INFO, logger="bigvl"):
    step, state = ck.restore_latest_good(target)
  ck.close()
  said = [r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage()]
  assert len(said) == 1 and f"/{STOP} is corrupt" in said[0] and len(said[0].splitlines()) == 1
  assert step == 4 and [d for d in os.listdir(wd) if d.startswith(f"{STOP}.corrupt-")]
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(jax.device_get(state)), strict=True):
    np.testing.assert_array_equal(a, b)


def test_every_checkpoint_corrupt_stops_the_run_instead_of_starting_afresh(runs, tiny_world,
                                                                          tmp_path):
  from bigvl.train import checkpoint, loop
  _, stopped = runs
  wd = str(tmp_path / "run")
  shutil.copytree(stopped, wd)
  for step in (2, 4, 6):
    CORRUPTIONS["flipped_bytes"](os.path.join(wd, "checkpoints", str(step)))
  with pytest.raises(checkpoint.NoGoodCheckpointError, match="no checkpoint .* reads and verifies"):
    loop.train(_cfg(tiny_world), wd)
  assert not [d for d in os.listdir(os.path.join(wd, "checkpoints")) if d.isdigit()]


def test_verify_checkpoint_names_the_bad_step_and_changes_nothing(runs, tmp_path):
  _, stopped = runs
  wd = str(tmp_path / "run")
  shutil.copytree(stopped, wd)
  script = [sys.executable, "launch/verify_checkpoint.py", f"--workdir={wd}"]
  good = subprocess.run(script, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert good.returncode == 0, good.stderr[-2000:]
  assert good.stdout.split() == ["2:", "ok", "4:", "ok", "6:", "ok"]
  CORRUPTIONS["random_4k_mid_file"](os.path.join(wd, "checkpoints", "4"))
  before = _snapshot(wd)
  bad = subprocess.run(script, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1, bad.stderr[-2000:]
  lines = bad.stdout.splitlines()
  # OCDBT's own checks may see it first (a small state is one file with its metadata).
  assert lines[0] == "2: ok" and lines[2] == "6: ok" and lines[1].startswith("4: ") and (
      "files differ from what was saved" in lines[1] and "its bytes changed" in lines[1]), lines
  assert _snapshot(wd) == before


@pytest.mark.parametrize("overrides", [   # huge_lr is slow: the same guard as eps0, another run
    pytest.param({"optim.eps": 0.0}, id="eps0"),
    pytest.param({"optim.lr": 1e30}, id="huge_lr", marks=pytest.mark.slow)])
def test_no_nonfinite_value_is_ever_saved_and_the_run_is_not_done(tiny_world, tmp_path, overrides):
  from bigvl.train import checkpoint, loop, nonfinite
  wd = str(tmp_path / "run")
  with pytest.raises(nonfinite.NonfiniteError):
    loop.train(_cfg(tiny_world, **overrides), wd)
  rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert not any(r.get("done") for r in rows)
  import jax
  import orbax.checkpoint as ocp
  steps = checkpoint.Checkpointer(os.path.join(wd, "checkpoints"), read_only=True).all_steps()
  for step in steps:   # whatever was saved holds only finite floats (read back as plain arrays)
    saved = ocp.StandardCheckpointer().restore(os.path.join(wd, "checkpoints", str(step), "state"))
    leaves = [np.asarray(x) for x in jax.tree.leaves(saved)]
    assert leaves and all(np.isfinite(x).all() for x in leaves
                          if np.issubdtype(x.dtype, np.floating)), step
  from bigvl.train import evaluate
  assert all(v == [] for v in evaluate.verify_run(wd).values())


def _snapshot(root):
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      out[os.path.relpath(p, root)] = open(p, "rb").read()
  return out


def test_a_refused_resume_changes_nothing_on_disk(runs, tiny_world, tmp_path):
  from bigvl.train import checkpoint, loop
  _, stopped = runs
  wd = str(tmp_path / "run")
  shutil.copytree(stopped, wd)
  before = _snapshot(wd)
  with pytest.raises(checkpoint.CheckpointMismatchError, match="shape"):
    loop.train(_cfg(tiny_world, **{"model.mlp_dim": 128}), wd)
  assert _snapshot(wd) == before


def test_a_changed_key_on_resume_keeps_the_earlier_config(runs, tiny_world, tmp_path):
  from bigvl.train import loop
  _, stopped = runs
  wd = str(tmp_path / "run")
  shutil.copytree(stopped, wd)
  earlier = open(os.path.join(wd, "config.json")).read()
  loop.train(_cfg(tiny_world, log_every=3), wd)
  assert open(os.path.join(wd, f"config.{STOP}.json")).read() == earlier
  assert json.load(open(os.path.join(wd, "config.json")))["log_every"] == 3


def _blocks(path):
  """Bytes a tree takes on disk (whole pages per file, as tmpfs charges them)."""
  return sum(os.stat(os.path.join(d, f)).st_blocks * 512 for d, _, fs in os.walk(path) for f in fs)


def _mount_tmpfs(where, size):
  os.makedirs(where, exist_ok=True)
  flags = ["-o", f"size={size}"] if not os.path.ismount(where) else ["-o", f"remount,size={size}"]
  return subprocess.run(["mount", "-t", "tmpfs", *flags, "tmpfs", where],
                        capture_output=True).returncode == 0


def test_disk_full_at_a_save_is_one_line_and_loses_nothing(runs, tiny_world, tmp_path, monkeypatch):
  """The stopped run on a tmpfs shrunk to what it holds plus half a checkpoint (or, where mounting
  is not allowed, ENOSPC simulated where orbax writes): resuming, the save of the last step fails
  with one line naming the space, the step before it stays intact, and once there is room the same
  call resumes to the digest of an uninterrupted run. (Sized from the pages the copy takes, not
  from its files' lengths: tmpfs charges a page per small file, and how many files OCDBT writes
  varies from run to run.)"""
  from bigvl.train import checkpoint, loop
  straight, stopped = runs
  mnt = str(tmp_path / "mnt")
  wd = os.path.join(mnt, "run")
  mounted = _mount_tmpfs(mnt, 64 << 20)
  try:
    shutil.copytree(stopped, wd)
    if mounted:
      one = _blocks(os.path.join(wd, "checkpoints", str(STOP)))
      used = shutil.disk_usage(mnt).used
      assert _mount_tmpfs(mnt, (used + one // 2) // 4096 * 4096)
    else:
      import orbax.checkpoint as ocp
      save = ocp.CheckpointManager.save

      def full_at_the_end(self, step, *a, **k):
        if step == TOTAL:
          raise OSError(28, "No space left on device")
        return save(self, step, *a, **k)
      monkeypatch.setattr(ocp.CheckpointManager, "save", full_at_the_end)
    with pytest.raises(checkpoint.DiskFullError) as e:
      loop.train(_cfg(tiny_world), wd)
    msg = str(e.value)
    failed = int(re.search(r"disk full saving step (\d+) in ", msg).group(1))
    assert len(msg.splitlines()) == 1 and "MiB free" in msg and failed == TOTAL, msg
    assert f"step {STOP} is intact" in msg, msg
    from bigvl.train import evaluate
    assert evaluate.verify_run(wd)[str(STOP)] == []
    if mounted:
      assert _mount_tmpfs(mnt, 64 << 20)   # space freed
    else:
      monkeypatch.undo()
    out = loop.train(_cfg(tiny_world), wd)
    assert out["params_sha256"] == straight["params_sha256"]
  finally:
    if mounted:
      subprocess.run(["umount", "-l", mnt])


# slow: two train.py processes; tests/test_lock.py checks the lock, its takeover and the race by default
@pytest.mark.slow
def test_a_second_run_on_a_live_workdir_stops_at_once_naming_the_holder(tiny_world, tmp_path):
  import signal
  import time
  from test_train import SMALL_FLAGS
  wd = str(tmp_path / "run")
  args = [sys.executable, "launch/train.py", "--config=configs/m2_tiny.py", f"--workdir={wd}",
          f"--config.data.dir={tiny_world}", *SMALL_FLAGS, "--config.batch_size=16",
          "--config.total_steps=100000", "--config.checkpoint_every=1000", "--config.log_every=1"]
  holder = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(wd, "metrics.jsonl")) and time.time() < deadline:
      time.sleep(0.2)
    t0 = time.time()
    second = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [l for l in second.stderr.splitlines() if l.startswith("train.py:")]
    assert second.returncode == 1 and len(lines) == 1, second.stderr[-2000:]
    assert "WorkdirLocked" in lines[0] and f"pid {holder.pid}" in lines[0], lines[0]
    assert time.time() - t0 < 60   # at once: before building anything
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # The holder is dead: the next run takes the lock over, says so, and trains.
  args[-3:] = ["--config.total_steps=2", "--config.checkpoint_every=1", "--config.log_every=1"]
  third = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert third.returncode == 0, third.stderr[-2000:]
  assert f"{holder.pid}" in third.stderr and "is gone" in third.stderr
