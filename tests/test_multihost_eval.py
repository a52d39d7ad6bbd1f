"""Two processes × 2 fake CPU devices (jax.distributed on 127.0.0.1, gloo) evaluate like one process
with 4 devices: each reads and runs the predictors only on its share, the last batches are padded
and masked, and the gathered embeddings give the same numbers, through `launch/eval.py` as on a
cluster."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, small_config
from test_eval_data import write_jsonl_set
from test_multihost import _env, _free_port


def _config_file(tmp_path, world, jsonl):
  # Batches of 8 over 72 world images and 7 JSON-lines images: every process ends on a partly
  # padded batch, and with 2 processes one block is shorter than the other.
  path = tmp_path / "eval_config.py"
  path.write_text(textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {os.path.join(REPO, "tests")!r})
      from conftest import small_config
      from bigvl.evaluators import kinds

      def get_config():
        c = small_config({world!r})
        with c.unlocked():
          for ev in c.evals.values():
            ev.batch_size = 8
          c.evals.jsonl = kinds.eval_config(kind="retrieval", source="jsonl:" + {jsonl!r},
                                            batch_size=8)
        return c
  """))
  return str(path)


def _eval_args(config, workdir, out):
  return [sys.executable, "launch/eval.py", f"--config={config}", f"--workdir={workdir}",
          f"--json={out}"]


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_two_processes_evaluate_like_one(tiny_world, tmp_path):
  from bigvl.train import loop
  wd = str(tmp_path / "run")
  loop.train(small_config(tiny_world, total_steps=2, checkpoint_every=2), wd)
  config = _config_file(tmp_path, tiny_world, write_jsonl_set(tiny_world, str(tmp_path / "j"), 7))

  one = str(tmp_path / "one.jsonl")
  r = subprocess.run(_eval_args(config, wd, one), cwd=REPO, env=_env(4), capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]

  two = str(tmp_path / "two.jsonl")
  port = _free_port()
  procs = [subprocess.Popen(
      _eval_args(config, wd, two) + [f"--coordinator_address=127.0.0.1:{port}",
                                     "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  try:
    outs = [p.communicate(timeout=600)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:   # a peer failed or timed out: don't leave one waiting on the other
        p.kill()
  assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)

  (a,), (b,) = _rows(one), _rows(two)     # one line each: only process 0 writes
  metrics = sorted(k for k in a if k not in ("step", "checkpoint"))
  assert sorted(k for k in b if k not in ("step", "checkpoint")) == metrics
  for k in ("zeroshot/en/top1", "zeroshot_all/zh/top5", "retrieval/mr", "retrieval/zh/t2i/r1",
            "jsonl/i2t/r1", "jsonl/mr"):
    assert k in metrics, k
  for k in metrics:
    assert b[k] == pytest.approx(a[k], abs=1e-6), k
