"""The ring pairwise matrix (bigvl/losses/ring_pairwise.py) against the dense score, on 1 and 8 fake
CPU devices: values and gradients of a loss on it, and no all-gather of the features it scores.

Needs XLA_FLAGS=--xla_force_host_platform_device_count=8 for the multi-device cases (the README's
test command sets it); with fewer devices they skip and say so.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from bigvl.losses.ring_pairwise import pairwise_matrix
from bigvl.parallel import mesh as mesh_lib

B, NT, NV, D = 16, 5, 3, 24


def _mesh(axes):
  need = math.prod(axes.values())
  if jax.device_count() < need:
    pytest.skip(f"needs {need} devices, have {jax.device_count()}: run with "
                "XLA_FLAGS=--xla_force_host_platform_device_count=8")
  return mesh_lib.make_mesh(axes, jax.devices()[:need])


def _score(x, xc, y, yc):
  """A token-wise score: per query token the max over the key's valid frames, weighted."""
  s = jnp.einsum("ind,jmd->ijnm", x["t"], y["v"])
  s = jnp.where(yc["m"][None, :, None, :] > 0, s, -1e9).max(-1)
  return (s * xc["w"][:, None, :]).sum(-1)


def _inputs(seed=0):
  r = np.random.default_rng(seed)
  x = {"t": jnp.asarray(r.normal(size=(B, NT, D)), jnp.float32)}
  xc = {"w": jnp.asarray(r.random((B, NT)), jnp.float32)}
  y = {"v": jnp.asarray(r.normal(size=(B, NV, D)), jnp.float32)}
  m = (r.random((B, NV)) > 0.3).astype(np.int32)
  m[:, 0] = 1
  return x, xc, y, {"m": jnp.asarray(m)}


def _loss(s):
  # A loss that reduces the column-sharded matrix along both axes (softmax rows and columns).
  return (-jnp.mean(jnp.diagonal(jax.nn.log_softmax(3 * s, axis=1)))
          - jnp.mean(jnp.diagonal(jax.nn.log_softmax(3 * s, axis=0))))


@pytest.mark.parametrize("axes", [{"data": 1}, {"data": 8}, {"data": 2, "fsdp": 4}])
def test_matrix_and_gradients_match_dense(axes):
  mesh = _mesh(axes)
  batch_axes = tuple(axes)
  x, xc, y, yc = _inputs()
  ref_s = _score(x, xc, y, yc)
  ref_l, ref_g = jax.value_and_grad(lambda a, b: _loss(_score(a, xc, b, yc)), (0, 1))(x, y)
  spec = NamedSharding(mesh, P(batch_axes))
  put = lambda t: jax.device_put(t, spec)
  args = [put(a) for a in (x, xc, y, yc)]
  matrix = lambda a, ac, b, bc: pairwise_matrix(_score, a, ac, b, bc, mesh, batch_axes=batch_axes)
  s = jax.jit(matrix)(*args)
  assert s.shape == (B, B)
  np.testing.assert_allclose(np.asarray(s), np.asarray(ref_s), atol=1e-5, rtol=1e-5)
  step = jax.jit(lambda a, ac, b, bc: jax.value_and_grad(
      lambda p, q: _loss(matrix(p, ac, q, bc)), (0, 1))(a, b))
  loss, grads = step(*args)
  assert abs(float(loss) - float(ref_l)) <= 1e-5
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_g)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  if math.prod(axes.values()) > 1:
    hlo = step.lower(*args).compile().as_text()
    gathers = [line for line in hlo.splitlines() if re.search(r"all-gather(-start)?\(", line)]
    # No all-gather of the features (their trailing dimension D) anywhere in the step.
    assert not [g for g in gathers if re.search(rf"\b{D}\]", g)], gathers
    assert "collective-permute" in hlo


def test_errors_name_the_culprit():
  mesh = _mesh({"data": 1})
  x, xc, y, yc = _inputs()
  with pytest.raises(ValueError, match="float arrays"):
    pairwise_matrix(_score, {"t": x["t"].astype(jnp.int32)}, xc, y, yc, mesh, batch_axes="data")
  with pytest.raises(ValueError, match="disagree"):
    pairwise_matrix(_score, x, {"w": xc["w"][:3]}, y, yc, mesh, batch_axes="data")
  with pytest.raises(ValueError, match="not in mesh axes"):
    pairwise_matrix(_score, x, xc, y, yc, mesh, batch_axes="model")
