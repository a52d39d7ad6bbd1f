"""Sharding changes where the numbers are computed, not what they are: m2_tiny on 8 fake devices with
data, fsdp and mixed data/fsdp/tensor meshes trains like on one device (to float32 rounding)."""

import jax
import ml_collections
import numpy as np
import pytest

from conftest import small_config

STEPS = 3
MESHES = {
    "data=8": {"mesh.data": 8, "mesh.fsdp": 1, "mesh.tensor": 1},
    "fsdp=8": {"mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1},
    "data=2,fsdp=2,tensor=2": {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2},
}


def _train(world, workdir, mesh, devices=None):
  from bigvl.export import params_io
  from bigvl.train import loop, metrics
  config = small_config(world, total_steps=STEPS, checkpoint_every=STEPS, **mesh)
  with config.unlocked():
    config.evals = ml_collections.ConfigDict()  # Not what is compared here.
  loop.train(config, workdir, devices=devices)
  losses = [r["train/loss"] for r in metrics.read_metrics(workdir) if "train/loss" in r]
  return losses, params_io.load_params(workdir)


# The default run trains the mixed mesh (every axis at once: data, fsdp and tensor sharding and their
# collectives); the pure data and fsdp meshes are the slow run's (each train costs a compile).
DEFAULT = ("data=2,fsdp=2,tensor=2",)


@pytest.mark.parametrize("names", [
    pytest.param(DEFAULT, id="mixed"),
    pytest.param(tuple(n for n in MESHES if n not in DEFAULT), id="data_and_fsdp",
                 marks=pytest.mark.slow)])
def test_meshes_train_like_one_device(tiny_world, tmp_path, names):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  want_losses, want_params = _train(tiny_world, str(tmp_path / "one"),
                                    {"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1},
                                    devices=jax.devices()[:1])
  assert len(want_losses) == STEPS
  for name in names:
    mesh = MESHES[name]
    losses, params = _train(tiny_world, str(tmp_path / name.replace(",", "_")), mesh)
    assert losses == pytest.approx(want_losses, rel=1e-5), name
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want_params))
    flat = dict(jax.tree_util.tree_leaves_with_path(params))
    assert flat.keys() == flat_want.keys(), name
    for path, want in flat_want.items():
      # Adam divides by the gradient's running RMS, so a rounding-level gradient difference moves a
      # parameter by up to ~lr·1e-3 per step: far below any real difference (lr = 1e-3 per step).
      np.testing.assert_allclose(flat[path], want, rtol=1e-4, atol=1e-5,
                                 err_msg=f"{name}: {jax.tree_util.keystr(path)}")
