"""The training loop end to end on a tiny model: metrics, checkpoints, resume, refusal of mismatches."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, small_config

# m2_tiny shrunk as in conftest.small_config, for the command-line tests.
SMALL_FLAGS = [
    "--config.data.world.num_train=512", "--config.data.world.num_eval=72",
    "--config.data.world.num_shards=2", "--config.data.world.vocab_size=384",
    "--config.model.width=32", "--config.model.heads=2", "--config.model.depth=1",
    "--config.model.vl_depth=1", "--config.model.mlp_dim=64", "--config.model.out_dim=16",
    "--config.model.patch_size=8", "--config.model.image_size=24", "--config.tokenizer.max_len=24",
    "--config.evals.zeroshot.batch_size=64"]


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


def test_train_writes_metrics_checkpoints_and_evals(tiny_world, tmp_path):
  from bigvl.train import loop
  wd = str(tmp_path / "run")
  out = loop.train(small_config(tiny_world), wd)
  rows = _rows(wd)
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert len(losses) == 4 and all(l > 0 for l in losses)
  for key in ("zeroshot/en/top1", "zeroshot/zh/top1", "retrieval/i2t/r1", "retrieval/t2i/r1"):
    assert 0.0 <= out[key] <= 1.0, key
    assert any(key in r for r in rows), key
  assert rows[-1]["params_sha256"] == out["params_sha256"]
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "4"]
  assert os.listdir(os.path.join(wd, "tensorboard"))


def test_resume_continues_where_it_stopped(tiny_world, tmp_path):
  from bigvl.train import loop
  wd = str(tmp_path / "run")
  straight = loop.train(small_config(tiny_world, total_steps=6, checkpoint_every=3), str(tmp_path / "a"))
  loop.train(small_config(tiny_world, total_steps=6, checkpoint_every=3), wd, stop_at=4)
  resumed = loop.train(small_config(tiny_world, total_steps=6, checkpoint_every=3), wd)
  steps = [r["step"] for r in _rows(wd) if "train/loss" in r]
  assert steps == [1, 2, 3, 4, 5, 6]     # resumed at 5, nothing repeated
  # Same data order and same updates: the resumed run ends bit-identical to the straight one.
  assert resumed["params_sha256"] == straight["params_sha256"]


def test_checkpoint_of_another_shape_is_refused(tiny_world, tmp_path):
  from bigvl.train import checkpoint, loop
  wd = str(tmp_path / "run")
  loop.train(small_config(tiny_world, total_steps=2), wd)
  with pytest.raises(checkpoint.CheckpointMismatchError, match="shape"):
    loop.train(small_config(tiny_world, total_steps=4, **{"model.mlp_dim": 128}), wd)


def test_unknown_config_key_is_an_error():
  cmd = [sys.executable, "launch/train.py", "--config=configs/m2_tiny.py", "--workdir=/tmp/x",
         "--config.batch_sise=8"]
  p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert p.returncode != 0 and "batch_sise" in p.stderr


def _logged_step(workdir):
  """The newest step in metrics.jsonl while a run may be appending to it (0: none yet)."""
  try:
    return max((r["step"] for r in _rows(workdir) if "train/loss" in r), default=0)
  except (OSError, ValueError):   # not there yet, or a line half written
    return 0


def test_killed_run_resumes_with_same_command(tiny_world, tmp_path):
  """SIGKILL at a random step, then the same command finishes from the last checkpoint with the
  parameters and the example ids (in order) of a run never interrupted."""
  import random
  from bigvl.train import loop
  total, every = 12, 3
  wd = str(tmp_path / "run")
  args = [sys.executable, "launch/train.py", "--config=configs/m2_tiny.py", f"--workdir={wd}",
          f"--config.data.dir={tiny_world}", *SMALL_FLAGS, "--config.batch_size=16",
          f"--config.total_steps={total}", f"--config.checkpoint_every={every}",
          "--config.log_every=1", "--config.optim.warmup_steps=1"]
  kill_at = random.randint(every + 1, total - 4)
  p = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and p.poll() is None and _logged_step(wd) < kill_at:
    time.sleep(0.02)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert not any(r.get("done") for r in _rows(wd)), f"finished before the kill at step {kill_at}"
  ckdir = os.path.join(wd, "checkpoints")
  saved = max(int(d) for d in os.listdir(ckdir) if d.isdigit())
  r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"resumed from step {saved}" in r.stderr
  final = _rows(wd)[-1]
  straight = loop.train(small_config(tiny_world, total_steps=total, checkpoint_every=every),
                        str(tmp_path / "straight"))
  assert final["done"] and final["step"] == total
  assert final["params_sha256"] == straight["params_sha256"], f"killed at step {kill_at}"
  assert final["data/ids_sha256"] == straight["data/ids_sha256"], f"killed at step {kill_at}"


def test_init_from_another_run_starts_from_its_params(tiny_world, tmp_path):
  from bigvl.train import loop
  a = loop.train(small_config(tiny_world, total_steps=2), str(tmp_path / "a"))
  # One step at learning rate 0 leaves the loaded parameters untouched: equal digests prove the
  # whole tree was loaded, not just its shapes.
  b = loop.train(small_config(tiny_world, total_steps=1, init_from=str(tmp_path / "a"),
                              **{"optim.lr": 0.0}), str(tmp_path / "b"))
  assert b["params_sha256"] == a["params_sha256"]


def test_resume_uses_the_run_tokenizer_even_if_the_world_changed(tiny_world, tmp_path):
  import filecmp
  import shutil
  from bigvl.tokenizers import sp_train
  from bigvl.train import loop
  world = str(tmp_path / "world")
  shutil.copytree(tiny_world, world)
  wd = str(tmp_path / "run")
  loop.train(_with_dir(small_config(tiny_world, total_steps=4), world), wd, stop_at=2)
  assert filecmp.cmp(os.path.join(wd, "tokenizer.model"), os.path.join(world, "tokenizer.model"))
  # Another tokenizer (another vocabulary size) appears where the world's was: the run must keep
  # its own, or its text embedding table would no longer match (and ids would silently change).
  sp_train.train_sentencepiece(["a red circle", "两个蓝色方块"] * 50,
                               os.path.join(world, "tokenizer.model"), 60)
  out = loop.train(_with_dir(small_config(tiny_world, total_steps=4), world), wd)
  assert out["params_sha256"]


def _with_dir(config, world):
  config.data.dir = world
  return config


# slow: two trainings; tests/test_ring_loss.py checks the loss and its gradients against the dense oracle
@pytest.mark.slow
def test_ring_loss_trains_like_the_dense_oracle(tiny_world, tmp_path):
  """On the 8 fake devices of the test command the default loss is the sharded ring: the loop
  must produce the losses of the exact dense loss, also with GradCache accumulation."""
  from bigvl.train import loop
  import jax
  if jax.device_count() < 2:
    pytest.skip("needs several devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  runs = {}
  for name, extra in {"dense": {"loss.impl": "dense"}, "ring": {},
                      "ring_accum": {"loss.accum_steps": 2}}.items():
    wd = str(tmp_path / name)
    loop.train(small_config(tiny_world, total_steps=3, **extra), wd)
    runs[name] = [r["train/loss"] for r in _rows(wd) if "train/loss" in r]
  assert len(runs["dense"]) == 3
  for name in ("ring", "ring_accum"):
    assert runs[name] == pytest.approx(runs["dense"], rel=1e-4), name


def test_eval_cli_reproduces_the_final_training_evals(tiny_world, tmp_path):
  from bigvl.train import loop
  wd = str(tmp_path / "run")
  trained = loop.train(small_config(tiny_world), wd)
  args = [sys.executable, "launch/eval.py", "--config=configs/m2_tiny.py", f"--workdir={wd}",
          f"--config.data.dir={tiny_world}", *SMALL_FLAGS]
  r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  with open(os.path.join(wd, "eval.jsonl")) as f:
    row = json.loads(f.readlines()[-1])
  assert row["step"] == 4
  for key in ("zeroshot/en/top1", "zeroshot/zh/top1", "retrieval/i2t/r1", "retrieval/t2i/r1"):
    assert row[key] == pytest.approx(trained[key], abs=1e-6), key
