"""launch/bench_loss.py at a tiny size (its own process, so it sets its own fake-device count)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "bench_loss.py")
KEYS = {"impl", "devices", "batch", "dim", "temp_bytes", "recv_bytes", "collectives", "time_s",
        "grad_err"}


def _module():
  spec = importlib.util.spec_from_file_location("bench_loss", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_collective_parser_counts_loop_trips():
  hlo = """HloModule m

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]) parameter(0)
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %cp = f32[4,8]{1,0} collective-permute(%x), channel_id=1, source_target_pairs={{0,1},{1,0}}
  ROOT %t = (s32[], f32[4,8]) tuple(%i, %cp)
}

ENTRY %main (a: f32[4,8]) -> f32[8,8] {
  %a = f32[4,8]{1,0} parameter(0)
  %w = (s32[], f32[4,8]{1,0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %ag = f32[8,8]{1,0} all-gather(%a), replica_groups={{0,1}}, dimensions={0}
  ROOT %ar = (f32[], f32[]) all-reduce(%s, %s2), replica_groups={{0,1}}, to_apply=%add
}
"""
  out = _module().collectives(hlo, 2)
  assert out["count"] == 3 + 1 + 1 and out["static_count"] == 3
  kinds = out["by_kind"]
  assert kinds["collective-permute"]["recv_bytes"] == 3 * 128
  assert kinds["all-gather"]["recv_bytes"] == 128          # half of the 256-byte output
  assert kinds["all-reduce"]["max_operand_bytes"] == 8


def test_oracle_matches_dense_loss():
  import jax.numpy as jnp
  import numpy as np
  from bigvl.losses import dense_contrastive_loss
  rng = np.random.default_rng(0)
  zi, zt = rng.standard_normal((2, 12, 4))
  want = dense_contrastive_loss(jnp.asarray(zi, jnp.float32), jnp.asarray(zt, jnp.float32),
                                jnp.float32(1.5))[0]
  loss, *_ = _module().oracle(zi, zt, 1.5, chunk=5)   # chunk smaller than the batch
  np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_runs_and_writes_json(tmp_path):
  out = tmp_path / "bench.jsonl"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, SCRIPT, "--devices", "4", "--dim", "16", "--batch", "32,64", "--reps", "1",
       "--json", str(out)], capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(r["impl"], r["batch"]) for r in records] == [
      (i, b) for b in (32, 64) for i in ("naive", "open_clip", "ring", "grouped")]
  for r in records:
    assert KEYS <= set(r), KEYS - set(r)
    assert r["devices"] == 4 and r["dim"] == 16
    assert r["grad_err"] < 1e-4 and r["time_s"] > 0, r
  by = {(r["impl"], r["batch"]): r for r in records}
  for b in (32, 64):
    ring, oc = by["ring", b], by["open_clip", b]
    assert set(ring["collective_kinds"]) == {"collective-permute", "all-reduce"}
    assert ring["recv_bytes"] < oc["recv_bytes"]
    assert by["grouped", b]["recv_bytes"] < ring["recv_bytes"]
  assert "impl" in proc.stdout and "grad err" in proc.stdout   # the table
