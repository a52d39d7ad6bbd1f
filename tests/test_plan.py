"""launch/plan.py: TPU slice names, and the real train step compiled ahead of time by libtpu for a
TPU topology on this CPU machine (skipped where libtpu is not installed)."""

import json
import os
import subprocess
import sys

import pytest

from bigvl.parallel import topology
from conftest import REPO

GiB = 1 << 30


@pytest.mark.parametrize("name, shape, hbm", [
    ("v5p-256", (4, 4, 8), 95 * GiB),
    ("v5p-8", (2, 2, 1), 95 * GiB),
    ("v4-32", (2, 2, 4), 32 * GiB),
    ("v4-8", (2, 2, 1), 32 * GiB),
    ("v5e-64", (8, 8), 16 * GiB),
    ("v5litepod-16", (4, 4), 16 * GiB),
    ("v5e-8", (2, 4), 16 * GiB),
    ("v6e-16", (4, 4), 32 * GiB),
    ("v6e-256", (16, 16), 32 * GiB),
    ("v5p:4x4x8", (4, 4, 8), 95 * GiB),
])
def test_slice_names(name, shape, hbm):
  s = topology.parse(name)
  assert s.shape == shape and s.chip.hbm_bytes == hbm
  assert s.topology_name == f"{s.chip.generation}:{'x'.join(map(str, shape))}"


@pytest.mark.parametrize("name", ["v7-8", "v5p-3", "v5p-12", "tpu-8", "v6e:4x4x4"])
def test_bad_slice_names(name):
  with pytest.raises(ValueError):
    topology.parse(name)


# m2_tiny shrunk: the TPU compile of its train step takes seconds.
SMALL = ["--config=configs/m2_tiny.py", "--topology=v5e-4", "--config.model.width=64",
         "--config.model.heads=2", "--config.model.depth=2", "--config.model.vl_depth=1",
         "--config.model.mlp_dim=128", "--config.model.out_dim=32", "--config.model.image_size=32",
         "--config.model.patch_size=8", "--config.tokenizer.max_len=16"]


def _plan(*flags):
  if not topology.libtpu_available():
    pytest.skip("libtpu is not installed (pip install -e '.[tpu]')")
  return subprocess.run([sys.executable, "launch/plan.py", *SMALL, *flags], cwd=REPO,
                        capture_output=True, text=True, timeout=600)


def test_aot_compile_on_a_tpu_topology(tmp_path):
  """m2_tiny (shrunk) trained with fsdp on a v5e-4 slice: compiled by libtpu, not run."""
  out = tmp_path / "plan.json"
  p = _plan(f"--json={out}", "--config.mesh.data=2", "--config.mesh.fsdp=2",
            "--config.model.scan_layers=True", "--config.model.remat=True",
            "--config.batch_size=32")
  assert p.returncode == 0, p.stderr[-3000:]
  report = json.loads(out.read_text())
  for key in ("params", "per_chip_bytes", "hbm_bytes", "global_batch"):
    assert key in report, key
  assert report["device_kind"].startswith("TPU v5") and report["chips"] == 4
  assert report["global_batch"] == 32 and report["per_chip_batch"] == 8
  assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
  b = report["per_chip_bytes"]
  # fsdp=2 halves the large parameters; Adam keeps two moments of each.
  assert 0.5 * report["params"] * 4 / 2 < b["params"] < 0.7 * report["params"] * 4
  assert b["opt_state"] >= 2 * b["params"]
  assert b["total"] >= b["params"] + b["opt_state"] and report["fits"]
  assert report["hbm_bytes"] == 16 * GiB
  assert report["flops_per_step"]["compiled_per_chip"] > 0
  assert report["flops_per_step"]["model_analytic"] > 0
  assert "fsdp" in json.dumps(report["largest_arrays"][0]["spec"])
  assert "HBM" in p.stdout


def test_a_step_over_the_chips_memory_is_refused_with_the_compilers_figure():
  p = _plan("--config.batch_size=262144")
  assert p.returncode == 1
  assert "does not fit" in p.stderr and "exceeds available HBM" in p.stderr


_MESH_ORDER = """
import json, sys
import numpy as np
sys.path.insert(0, ".")
from jax.experimental import mesh_utils
from bigvl.parallel import mesh, topology
out = {}
for name, shape in (("v5p-16", (2, 4, 1)), ("v4-32", (4, 4, 1)), ("v5e-16", (2, 8, 1))):
  devs = topology.devices(topology.parse(name))
  m = mesh.make_mesh({"data": shape[0], "fsdp": shape[1], "tensor": shape[2]}, devs)
  ref = mesh_utils.create_device_mesh(list(shape), devs, allow_split_physical_axes=True)
  out[name] = {"as_create_device_mesh": bool((m.devices == ref).all()),
               "listed_order_differs": bool((ref != np.asarray(devs).reshape(shape)).any())}
print(json.dumps(out))
"""


def test_the_mesh_runs_along_the_torus_on_tpu_topologies():
  """make_mesh places TPU devices as mesh_utils.create_device_mesh does (fsdp and tensor collectives
  between neighbouring chips), not in their listed order, which differs on these slices."""
  if not topology.libtpu_available():
    pytest.skip("libtpu is not installed (pip install -e '.[tpu]')")
  p = subprocess.run([sys.executable, "-c", _MESH_ORDER], cwd=REPO, capture_output=True, text=True,
                     timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  got = json.loads(p.stdout.splitlines()[-1])
  assert all(v == {"as_create_device_mesh": True, "listed_order_differs": True}
             for v in got.values()), got
