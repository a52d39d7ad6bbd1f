"""Runs that survive preemption, crashes, bad data and NaNs, and configs refused before compiling.

(The SIGKILL-at-a-random-step resume is tests/test_train.py::test_killed_run_resumes_with_same_command.)
"""

import collections
import glob
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, small_config
from test_train import SMALL_FLAGS, _logged_step, _rows


def _cli_args(world, workdir, *extra):
  return [sys.executable, "launch/train.py", "--config=configs/m2_tiny.py", f"--workdir={workdir}",
          f"--config.data.dir={world}", *SMALL_FLAGS, "--config.batch_size=16",
          "--config.optim.warmup_steps=1", *extra]


def _wait_for_step(workdir, step, proc, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if _logged_step(workdir) >= step:
      return
    time.sleep(0.02)
  raise AssertionError(f"step {step} never logged (exit code {proc.poll()})")


# ------------------------------------------------------------------------------------ preemption

def test_sigterm_finishes_the_step_saves_and_exits_0_then_resume_continues(tiny_world, tmp_path):
  from bigvl.train import loop
  wd = str(tmp_path / "run")
  # checkpoint_every beyond the run: the only checkpoint can be the one the signal asked for.
  args = _cli_args(tiny_world, wd, "--config.total_steps=400", "--config.checkpoint_every=1000",
                   "--config.log_every=1")
  p = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for_step(wd, 3, p)
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=120)
  assert p.returncode == 0, err[-3000:]
  last = max(r["step"] for r in _rows(wd) if "train/loss" in r)
  assert os.listdir(os.path.join(wd, "checkpoints")) == [str(last)]
  assert f"checkpoint saved in {os.path.join(wd, 'checkpoints', str(last))}" in out
  assert "SIGTERM" in out and not any(r.get("done") for r in _rows(wd))

  loop.train(small_config(tiny_world, total_steps=400, checkpoint_every=1000), wd, stop_at=last + 2)
  steps = [r["step"] for r in _rows(wd) if "train/loss" in r]
  assert steps[-3:] == [last, last + 1, last + 2]


# slow: two processes under SIGTERM (the one-process SIGTERM test and test_multihost run by default)
@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tiny_world, tmp_path):
  """Under jax.distributed, JAX's preemption service owns SIGTERM and picks the step to stop at."""
  from test_multihost import _env, _free_port
  wd = str(tmp_path / "run")
  port = _free_port()
  args = _cli_args(tiny_world, wd, "--config.total_steps=400", "--config.checkpoint_every=1000",
                   "--config.log_every=1", f"--coordinator_address=127.0.0.1:{port}",
                   "--num_processes=2")
  procs = [subprocess.Popen(args + [f"--process_id={i}"], cwd=REPO, env=_env(4), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  try:
    _wait_for_step(wd, 3, procs[0])
    procs[1].send_signal(signal.SIGTERM)   # only the second process is told
    outs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  last = max(r["step"] for r in _rows(wd) if "train/loss" in r)
  assert os.listdir(os.path.join(wd, "checkpoints")) == [str(last)]
  assert sorted(f for f in os.listdir(os.path.join(wd, "checkpoints", str(last), "data"))
                if f.startswith("process_")) == ["process_0-of-2.json", "process_1-of-2.json"]
  for out in outs:
    assert f"stopped after step {last}, checkpoint saved in" in out


def test_preemption_is_agreed_on_by_all_processes():
  """Without JAX's preemption service, processes compare their flags every `agree_every` steps,
  so a signal that reached one process stops all of them at the same step."""
  from bigvl.train import preemption
  flags = {0: False, 1: False}   # two fake processes sharing a fake all-gather
  procs = [preemption.Preemption(process_count=2, agree_every=5,
                                 any_process=lambda _: any(flags.values())) for _ in flags]
  procs[1].requested = flags[1] = "SIGTERM"   # only process 1 was told
  stops = [[s for s in range(1, 12) if p.should_stop(s)] for p in procs]
  assert stops[0][0] == stops[1][0] == 5


# ----------------------------------------------------------------------------- atomic checkpoints

def test_incomplete_checkpoints_are_never_picked(tmp_path):
  import jax.numpy as jnp
  from bigvl.export import params_io
  from bigvl.train import checkpoint
  root = tmp_path / "run" / "checkpoints"
  c = checkpoint.Checkpointer(str(root))
  c.save(2, {"params": {"w": jnp.ones(3)}})
  c.save(4, {"params": {"w": jnp.ones(3)}})
  c.close()
  # A step directory without orbax's commit marker (a copy cut short, a filesystem without atomic
  # rename) and orbax's own temporary directory of a save that never finished.
  shutil.copytree(root / "4", root / "6")
  os.remove(root / "6" / checkpoint.COMMIT_MARKER)
  shutil.copytree(root / "4", root / "8.orbax-checkpoint-tmp-1234")
  assert params_io.checkpoint_step(str(tmp_path / "run")) == 4
  c = checkpoint.Checkpointer(str(root))
  assert c.latest_step() == 4 and c.all_steps() == [2, 4]
  c.save(6, {"params": {"w": jnp.ones(3)}})   # the step can be saved again
  assert c.latest_step() == 6
  c.close()
  assert any(n.startswith("6.incomplete-") for n in os.listdir(root))


_KILL_DURING_SAVE = """
import os, sys
sys.path[:0] = [{repo!r}, {tests!r}]
from orbax.checkpoint._src.path import atomicity
finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def dying_finalize(self):
  if self.get_final().name == "4":   # everything written, not yet committed: die
    os._exit(9)
  return await finalize(self)
atomicity.AtomicRenameTemporaryPath.finalize = dying_finalize
from conftest import small_config
from bigvl.train import loop
loop.train(small_config({world!r}, total_steps=6, checkpoint_every=2), {wd!r})
"""


def test_a_process_killed_while_saving_leaves_a_resumable_workdir(tiny_world, tmp_path):
  from bigvl.train import loop
  wd = str(tmp_path / "run")
  code = _KILL_DURING_SAVE.format(repo=REPO, tests=os.path.join(REPO, "tests"), world=tiny_world,
                                  wd=wd)
  p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                     timeout=300)
  assert p.returncode == 9, p.stderr[-2000:]
  names = os.listdir(os.path.join(wd, "checkpoints"))
  assert "2" in names and "4" not in names and any(".orbax-checkpoint-tmp" in n for n in names)
  loop.train(small_config(tiny_world, total_steps=6, checkpoint_every=2), wd)
  steps = [r["step"] for r in _rows(wd) if "train/loss" in r]
  assert steps == [1, 2, 3, 4, 3, 4, 5, 6]   # steps 3 and 4 again, from checkpoint 2
  assert _rows(wd)[-1]["done"]


# -------------------------------------------------------------------------------------- bad data

def _jpeg(pixels):
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="JPEG")
  return buf.getvalue()


def _bad_shards(world, out, *, bad_fraction_in_second=0.1, truncated=True):
  """Two shards of 96 records made from the world's images, with corrupt JPEGs, undecodable bytes,
  empty and missing captions and unparsable records, and (optionally) a truncated third shard.
  Returns {global record index: reason} of the bad ones."""
  import msgpack
  from array_record.python.array_record_module import ArrayRecordWriter
  from bigvl.data.formats import records
  from bigvl.data.formats import image_text
  examples = image_text.load_examples(sorted(glob.glob(os.path.join(world, "train-*.array_record"))))
  os.makedirs(out)
  bad = {}
  for f in range(2):
    w = ArrayRecordWriter(os.path.join(out, f"train-{f:05d}.array_record"), "group_size:1")
    for i in range(96):
      ex = dict(examples[f * 96 + i])
      payload, reason = None, None
      if f == 0 and i % 12 == 3:
        ex["image"], reason = ex["image"][: len(ex["image"]) // 2], image_text.BAD_IMAGE  # truncated
      elif f == 0 and i % 12 == 7:
        ex["image"], reason = b"\xff\xd8\xff\xe0 not a jpeg", image_text.BAD_IMAGE
      elif f == 1 and i < 96 * bad_fraction_in_second:
        kind = i % 3
        if kind == 0:
          ex["caption"], reason = "   ", image_text.BAD_CAPTION
        elif kind == 1:
          ex.pop("caption")
          payload, reason = msgpack.packb(ex, use_bin_type=True), image_text.BAD_RECORD
        else:
          payload, reason = b"\xc1 not msgpack", image_text.BAD_RECORD
      w.write(payload if payload is not None else records.encode_record(ex))
      if reason:
        bad[f * 96 + i] = reason
    w.close()
  if truncated:
    full = open(os.path.join(out, "train-00000.array_record"), "rb").read()
    with open(os.path.join(out, "train-00002.array_record"), "wb") as g:
      g.write(full[: len(full) // 2])
  return bad


def _shards_config(world, shard_dir, **kw):
  c = small_config(world, **{"data.kind": "shards",
                             "data.train_files": os.path.join(shard_dir, "train-*.array_record"),
                             "tokenizer.path": os.path.join(world, "tokenizer.model"), **kw})
  for ev in c.evals.values():
    ev.source = ""   # the world's evaluations need the world's data
  return c


def _expected_skips(bad, num_records, seed, good_rows):
  """Walks the pipeline's shuffled order until `good_rows` good records were served."""
  import grain
  from bigvl.data import stream
  order = grain.MapDataset.range(num_records).shuffle(seed=stream._shuffle_seed(seed)).repeat()
  counts, i = collections.Counter(), 0
  while good_rows:
    index = order[i]
    i += 1
    if index in bad:
      counts[bad[index]] += 1
    else:
      good_rows -= 1
  return counts


def test_bad_records_and_a_truncated_shard_are_skipped_counted_and_logged(tiny_world, tmp_path,
                                                                           caplog):
  from bigvl.data.formats import image_text
  from bigvl.train import loop
  shard_dir = str(tmp_path / "shards")
  bad = _bad_shards(tiny_world, shard_dir)
  steps = 12    # 192 rows: more than one pass over the 192 - 26 good records
  # One of three shard files is unreadable: allowed by a limit of 0.4.
  config = _shards_config(tiny_world, shard_dir, total_steps=steps,
                          **{"data.max_skip_fraction": 0.4})
  with caplog.at_level("WARNING"):
    out = loop.train(config, str(tmp_path / "run"))
  want = _expected_skips(bad, 192, config.seed, steps * config.batch_size)
  rows = _rows(str(tmp_path / "run"))
  assert rows[-1]["done"] and np.isfinite([r["train/loss"] for r in rows if "train/loss" in r]).all()
  final = rows[-1]
  assert final["data/skipped"] == sum(want.values()) > 0 and final["data/skipped_shards"] == 1
  for reason in image_text.REASONS:
    assert final[f"data/skipped/{reason}"] == want[reason] > 0, reason
  assert out["data/skipped"] == final["data/skipped"]
  assert "train-00002.array_record: cannot be read" in caplog.text
  assert "train-00000.array_record) record 3 " in caplog.text   # the shard and the record


# slow: a whole run for the stream's DataQualityError (the bad-records run is in the default set)
@pytest.mark.slow
def test_too_many_bad_records_stop_the_run_naming_the_worst_shard(tiny_world, tmp_path):
  from bigvl.data import stream
  from bigvl.train import loop
  shard_dir = str(tmp_path / "shards")
  _bad_shards(tiny_world, shard_dir, bad_fraction_in_second=0.5, truncated=False)  # 64 of 192 bad
  config = _shards_config(tiny_world, shard_dir, total_steps=40,
                          **{"data.max_skip_fraction": 0.2})
  with pytest.raises(stream.DataQualityError,
                     match=r"max_skip_fraction=0.2: worst shard .*train-00001.array_record"):
    loop.train(config, str(tmp_path / "run"))


def test_too_many_unreadable_shards_stop_the_run_before_training(tiny_world, tmp_path):
  from bigvl.data import stream
  from bigvl.train import loop
  shard_dir = str(tmp_path / "shards")
  _bad_shards(tiny_world, shard_dir)
  with pytest.raises(stream.DataQualityError, match=r"1 of 3 shard files.*train-00002"):
    loop.train(_shards_config(tiny_world, shard_dir), str(tmp_path / "run"))
  assert not os.path.exists(str(tmp_path / "run" / "checkpoints" / "1"))


# ---------------------------------------------------------------------------- numerical faults

@pytest.fixture
def nan_batches(monkeypatch):
  """`nan_batches(steps)`: from then on, the training batches of those steps make a NaN loss (token
  ids past the vocabulary, which the embedding lookup fills with NaN; the images are uint8)."""
  import grain
  from bigvl.systems.m2_encoder import system as m2_system

  class NaNImages(grain.DatasetIterator):
    def __init__(self, parent, steps):
      super().__init__(parent)
      self.steps, self.step = steps, 0

    def __next__(self):
      batch, self.step = next(self._parent), self.step + 1
      if self.step in self.steps:
        batch = {**batch, "text": np.full_like(batch["text"], 2**30)}
      return batch

    def get_state(self):
      return self._parent.get_state()

    def set_state(self, state):
      self._parent.set_state(state)

    def stats(self):
      return self._parent.stats()

    @property
    def ids_sha256(self):
      return self._parent.ids_sha256

  def install(steps):
    make = m2_system.M2EncoderSystem.train_data
    monkeypatch.setattr(m2_system.M2EncoderSystem, "train_data",
                        lambda self, *a: NaNImages(make(self, *a), set(steps)))
  return install


def test_nonfinite_steps_are_skipped_and_counted(tiny_world, tmp_path, nan_batches):
  from bigvl.train import loop
  nan_batches({3, 4})
  out = loop.train(small_config(tiny_world, total_steps=6), str(tmp_path / "run"))
  rows = {r["step"]: r for r in _rows(str(tmp_path / "run")) if "train/loss" in r}
  assert [rows[s]["train/nonfinite"] for s in range(1, 7)] == [0, 0, 1, 1, 0, 0]
  assert np.isnan(rows[3]["train/loss"]) and np.isfinite(rows[6]["train/loss"])
  assert out["train/nonfinite_skipped"] == 2
  from bigvl.export import params_io
  params = params_io.load_params(str(tmp_path / "run"))
  assert all(np.isfinite(np.asarray(p)).all() for p in __import__("jax").tree.leaves(params))


def test_a_stream_of_nonfinite_steps_stops_the_run_keeping_the_last_good_checkpoint(
    tiny_world, tmp_path, nan_batches):
  import jax
  from bigvl.export import params_io
  from bigvl.train import loop, nonfinite
  nan_batches(set(range(3, 100)))
  wd = str(tmp_path / "run")
  with pytest.raises(nonfinite.NonfiniteError,
                     match=r"3 steps in a row .*max_nonfinite_in_a_row=3.*checkpoints/2"):
    loop.train(small_config(tiny_world, total_steps=10, checkpoint_every=2,
                            max_nonfinite_in_a_row=3), wd)
  # Step 4's checkpoint fell inside the streak and was not written: step 2 is the newest.
  assert os.listdir(os.path.join(wd, "checkpoints")) == ["2"]
  params = params_io.load_params(wd)
  assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))


# --------------------------------------------------------------------------- config validation

INVALID = {
    # flags → what the one-line error must say
    "unknown key": (["--config.optim.lrr=1"], "unknown config key 'lrr'"),
    "batch": (["--config.batch_size=12"], "batch_size=12 must be a multiple of 8"),
    "mesh": (["--config.mesh.fsdp=16"], "the fixed axes need 16 devices"),
    "data path": (["--config.data.kind=shards", "--config.data.train_files=/nonexistent/*.rec",
                   "--config.tokenizer.path=/etc/hostname"],
                  "data.train_files='/nonexistent/*.rec' matches no file"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_config_is_one_line_before_anything_compiles(case, tmp_path):
  flags, message = INVALID[case]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  r = subprocess.run([sys.executable, "launch/train.py", "--config=configs/m2_tiny.py",
                      f"--workdir={tmp_path / 'run'}", *flags],
                     cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
  assert r.returncode == 1
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert "ConfigError" in last and message in last, last
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_invalid_config_errors_in_process(tiny_world):
  from bigvl.train import config_lib
  c = small_config(tiny_world)
  with c.unlocked():
    c.optim.lrr = 1.0   # a config file can add keys before it is locked
  with pytest.raises(config_lib.ConfigError, match=r"'optim.lrr' \(did you mean 'optim.lr'\?\)"):
    config_lib.validate(c)
  with pytest.raises(config_lib.ConfigError, match="mesh .* needs 4 devices, there are 8"):
    config_lib.validate(small_config(tiny_world, **{"mesh.data": 4}), num_devices=8)
  with pytest.raises(config_lib.ConfigError, match="init_from='/nonexistent' does not exist"):
    config_lib.validate(small_config(tiny_world, init_from="/nonexistent"))
