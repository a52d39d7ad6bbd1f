"""Two processes × 4 fake CPU devices on 127.0.0.1 (jax.distributed, gloo) train like one process.

The runs go through `launch/train.py`, as on a cluster: the 2-process run gets the losses of the
1-process 8-device run, and its checkpoints restore in one process with other device counts, both
mid-run (the data position moves to the new process count) and at the end (bit-identical params).
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import REPO
from test_train import SMALL_FLAGS

STEPS = 4


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _args(world, workdir):
  # fsdp over every device: the parameters of the 2-process run are sharded across both processes.
  return [sys.executable, "launch/train.py", "--config=configs/m2_tiny.py", f"--workdir={workdir}",
          f"--config.data.dir={world}", *SMALL_FLAGS, "--config.batch_size=16",
          f"--config.total_steps={STEPS}", "--config.checkpoint_every=2", "--config.log_every=1",
          "--config.optim.warmup_steps=1", "--config.mesh.data=1", "--config.mesh.fsdp=-1"]


def _env(devices):
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _run(world, workdir, devices):
  r = subprocess.run(_args(world, workdir), cwd=REPO, env=_env(devices), capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return r


def run_processes(args, num_processes, devices):
  """Runs the command `args` (a launch/ script) as processes 0..n-1 of one run on 127.0.0.1, each
  with `devices` fake CPU devices; asserts that all succeed and returns their outputs."""
  port = _free_port()
  procs = [subprocess.Popen(
      args + [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
              f"--process_id={i}"],
      cwd=REPO, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(num_processes)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=600)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _losses(workdir):
  return {r["step"]: r["train/loss"] for r in _rows(workdir) if "train/loss" in r}


def test_two_processes_train_like_one_and_their_checkpoints_restore_anywhere(tiny_world, tmp_path):
  two, one = str(tmp_path / "two"), str(tmp_path / "one")
  run_processes(_args(tiny_world, two), 2, 4)
  _run(tiny_world, one, 8)

  # Same global batches, same updates: the losses agree to float32 rounding (the reductions of the
  # cross-process collectives run in another order).
  want = _losses(one)
  assert sorted(want) == list(range(1, STEPS + 1))
  assert _losses(two) == pytest.approx(want, rel=1e-5)
  final_two = _rows(two)[-1]
  assert final_two["done"] and final_two["params_sha256"]
  for key in ("zeroshot/en/top1", "retrieval/i2t/r1", "retrieval/t2i/r1"):
    assert any(key in r for r in _rows(two)), key
  data = os.listdir(os.path.join(two, "checkpoints", str(STEPS), "data"))
  assert sorted(f for f in data if f.startswith("process_")) == [
      "process_0-of-2.json", "process_1-of-2.json"]

  # Mid-run: the 2-process checkpoint of step 2 resumes in one process on 2 devices, on the global
  # batch the 2-process run would have read next.
  mid = str(tmp_path / "mid")
  shutil.copytree(two, mid)
  shutil.rmtree(os.path.join(mid, "checkpoints", str(STEPS)))
  r = _run(tiny_world, mid, 2)
  assert "resumed from step 2" in r.stderr
  resumed = {s: l for s, l in _losses(mid).items() if s > 2}
  assert resumed == pytest.approx({s: want[s] for s in (3, 4)}, rel=1e-5)

  # At the end: the finished run restores in one process on 1 device, bit for bit.
  shutil.copytree(two, str(tmp_path / "end"))
  _run(tiny_world, str(tmp_path / "end"), 1)
  assert _rows(str(tmp_path / "end"))[-1]["params_sha256"] == final_two["params_sha256"]
