"""The ring contrastive loss against a float64 dense oracle, on up to 8 fake CPU devices.

Needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (the README's test command sets it);
with fewer devices the multi-device cases skip and say so.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from bigvl.losses import contrastive_loss, dense_contrastive_loss
from bigvl.parallel import mesh as mesh_lib

SCALE = math.log(1 / 0.07)


def _mesh(axes: dict[str, int]) -> jax.sharding.Mesh:
  need = math.prod(axes.values())
  if jax.device_count() < need:
    pytest.skip(f"needs {need} devices, have {jax.device_count()}: run with "
                "XLA_FLAGS=--xla_force_host_platform_device_count=8")
  return mesh_lib.make_mesh(axes, jax.devices()[:need])


def _embeddings(batch: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  z = np.random.default_rng(seed).standard_normal((2, batch, dim)).astype(np.float32)
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  return z[0], z[1]


def oracle(zi, zt, scale, groups=1):
  """float64 (loss, d zi, d zt, d scale): mean over consecutive equal groups of dense InfoNCE."""
  zi, zt = np.asarray(zi, np.float64), np.asarray(zt, np.float64)
  t, total, size = math.exp(scale), len(zi), len(zi) // groups
  loss, dscale, dzi, dzt = 0.0, 0.0, np.zeros_like(zi), np.zeros_like(zt)
  for g0 in range(0, total, size):
    a, b = zi[g0:g0 + size], zt[g0:g0 + size]
    s = t * a @ b.T
    p_row = np.exp(s - s.max(1, keepdims=True))
    p_row /= p_row.sum(1, keepdims=True)
    p_col = np.exp(s - s.max(0, keepdims=True))
    p_col /= p_col.sum(0, keepdims=True)
    lse_r = np.log(np.exp(s - s.max(1, keepdims=True)).sum(1)) + s.max(1)
    lse_c = np.log(np.exp(s - s.max(0, keepdims=True)).sum(0)) + s.max(0)
    loss += np.sum(lse_r + lse_c - 2 * np.diag(s)) / (2 * total)
    grad = (p_row + p_col - 2 * np.eye(size)) / (2 * total)   # d loss / d logits
    dzi[g0:g0 + size] = t * grad @ b
    dzt[g0:g0 + size] = t * grad.T @ a
    dscale += np.sum(grad * s)
  return loss, dzi, dzt, dscale


def _run(mesh, zi, zt, scale, **kw):
  axes = kw.get("batch_axes") or tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
  rows = NamedSharding(mesh, P(axes))
  fn = jax.jit(jax.value_and_grad(lambda a, b, s: contrastive_loss(a, b, s, mesh, **kw),
                                  argnums=(0, 1, 2), has_aux=True))
  return fn(jax.device_put(zi, rows), jax.device_put(zt, rows), jnp.float32(scale))


def _close(got, want, rtol):
  """Relative to the largest entry; the 1e-6 floor is for b = 1, where loss and gradients are 0."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=max(rtol * np.max(np.abs(want)), 1e-6))


CASES = [(n, g, b) for n in (1, 2, 4, 8) for g in (1, 2, 4, 8) if g <= n for b in (1, 3, 16)]


@pytest.mark.parametrize("n,g,b", CASES)
def test_matches_float64_oracle(n, g, b):
  mesh = _mesh({"data": n})
  zi, zt = _embeddings(n * b, 8, seed=n * 100 + g * 10 + b)
  (loss, _), grads = _run(mesh, zi, zt, SCALE, group_size=g)
  want = oracle(zi, zt, SCALE, groups=n // g)
  _close(loss, want[0], 1e-5)
  for got, w in zip(grads, want[1:]):
    _close(got, w, 1e-5)


@pytest.mark.parametrize("b,block_rows", [(16, 6), (3, 2), (16, 4)])
def test_row_tiling_with_padding(b, block_rows):
  mesh = _mesh({"data": 4})
  zi, zt = _embeddings(4 * b, 8, seed=b)
  (loss, _), grads = _run(mesh, zi, zt, SCALE, block_rows=block_rows)
  want = oracle(zi, zt, SCALE)
  _close(loss, want[0], 1e-5)
  for got, w in zip(grads, want[1:]):
    _close(got, w, 1e-5)


def test_metrics_match_dense_loss():
  mesh = _mesh({"data": 8})
  zi, zt = _embeddings(8 * 16, 4, seed=1)   # d = 4: noisy, so accuracies are neither 0 nor 1
  (loss, metrics), _ = _run(mesh, zi, zt, SCALE)
  want_loss, want = dense_contrastive_loss(jnp.asarray(zi), jnp.asarray(zt), jnp.float32(SCALE))
  assert set(metrics) == set(want)
  _close(loss, want_loss, 1e-5)
  for k in want:
    _close(metrics[k], want[k], 1e-5)
  assert 0 < float(metrics["acc_i2t"]) < 1


def test_grouped_is_mean_of_group_dense_losses():
  mesh = _mesh({"data": 8})
  zi, zt = _embeddings(8 * 3, 8, seed=2)
  (loss, _), _ = _run(mesh, zi, zt, SCALE, group_size=2)
  per_group = [dense_contrastive_loss(jnp.asarray(zi[k:k + 6]), jnp.asarray(zt[k:k + 6]),
                                      jnp.float32(SCALE))[0] for k in range(0, 24, 6)]
  _close(loss, np.mean(per_group), 1e-5)


@pytest.mark.parametrize("axes,batch_axes,g", [
    ({"data": 4, "fsdp": 2}, None, 4),          # default: the batch over ("data", "fsdp")
    ({"data": 4, "tensor": 2}, None, 2),        # replicated over "tensor"
    ({"data": 2, "fsdp": 4}, ("data", "fsdp"), 8),
])
def test_multi_axis_meshes(axes, batch_axes, g):
  mesh = _mesh(axes)
  shards = mesh.shape["data"] * mesh.shape.get("fsdp", 1)
  zi, zt = _embeddings(shards * 3, 8, seed=3)
  (loss, _), grads = _run(mesh, zi, zt, SCALE, batch_axes=batch_axes, group_size=g)
  want = oracle(zi, zt, SCALE, groups=shards // g)
  _close(loss, want[0], 1e-5)
  for got, w in zip(grads, want[1:]):
    _close(got, w, 1e-5)


def test_large_temperature_is_stable():
  mesh = _mesh({"data": 4})
  zi, zt = _embeddings(4 * 16, 8, seed=4)
  scale = math.log(100.0)
  (loss, _), grads = _run(mesh, zi, zt, scale)
  want = oracle(zi, zt, scale)
  _close(loss, want[0], 1e-5)
  for got, w in zip(grads, want[1:]):
    _close(got, w, 1e-5)


def test_bfloat16_inputs_accumulate_in_float32():
  mesh = _mesh({"data": 8})
  zi, zt = _embeddings(8 * 16, 32, seed=5)
  zi16, zt16 = jnp.asarray(zi, jnp.bfloat16), jnp.asarray(zt, jnp.bfloat16)
  (loss, _), grads = _run(mesh, zi16, zt16, SCALE)
  assert loss.dtype == jnp.float32
  assert grads[0].dtype == grads[1].dtype == jnp.bfloat16
  want = oracle(np.asarray(zi16, np.float32), np.asarray(zt16, np.float32), SCALE)
  _close(loss, want[0], 1e-5)   # the logits are exact products of bf16 values, summed in f32
  for got, w in zip(grads, want[1:]):
    _close(got, w, 2e-2)        # bf16 matmul operands and bf16 results in the backward pass


def test_compiled_loss_has_no_all_gather_and_only_scalar_all_reduces():
  mesh = _mesh({"data": 8})
  zi, zt = _embeddings(8 * 16, 8)
  rows = NamedSharding(mesh, P("data"))
  for g in (8, 4):
    fn = jax.jit(jax.value_and_grad(lambda a, b, s: contrastive_loss(a, b, s, mesh, group_size=g),
                                    argnums=(0, 1, 2), has_aux=True))
    hlo = fn.lower(jax.device_put(zi, rows), jax.device_put(zt, rows),
                   jnp.float32(SCALE)).compile().as_text()
    ops = re.findall(r"=\s*(.*?)\s(all-gather|all-reduce|reduce-scatter|all-to-all|"
                     r"collective-permute)(?:-start)?\(", hlo)
    kinds = {k for _, k in ops}
    assert "collective-permute" in kinds
    assert not kinds & {"all-gather", "reduce-scatter", "all-to-all"}, kinds
    for result, kind in ops:
      if kind == "all-reduce":
        shapes = re.findall(r"\w+\[([\d,]*)\]", result)
        assert shapes and all(s == "" for s in shapes), f"non-scalar all-reduce: {result}"
    perms = re.findall(r"source_target_pairs=\{([\d,{}]*)\}", hlo)
    for p in perms:   # the ring never leaves a group of g consecutive shards
      for src, dst in re.findall(r"\{(\d+),(\d+)\}", p):
        assert int(src) // g == int(dst) // g


def test_temporaries_stay_far_below_b_times_batch():
  mesh = _mesh({"data": 8})
  batch, dim = 4096, 64
  b = batch // 8
  zi, zt = _embeddings(batch, dim)
  rows = NamedSharding(mesh, P("data"))
  fn = jax.jit(jax.value_and_grad(lambda a, c, s: contrastive_loss(a, c, s, mesh)[0],
                                  argnums=(0, 1, 2)))
  temp = fn.lower(jax.device_put(zi, rows), jax.device_put(zt, rows),
                  jnp.float32(SCALE)).compile().memory_analysis().temp_size_in_bytes
  assert temp < b * batch * 4 / 4, temp   # one b×B float32 logits block would be 8 MiB


def test_rejects_bad_arguments():
  mesh = _mesh({"data": 4})
  zi, zt = _embeddings(8, 4)
  with pytest.raises(ValueError, match="group_size"):
    contrastive_loss(jnp.asarray(zi), jnp.asarray(zt), jnp.float32(0), mesh, group_size=3)
  with pytest.raises(ValueError, match="divisible"):
    contrastive_loss(jnp.asarray(zi[:6]), jnp.asarray(zt[:6]), jnp.float32(0), mesh)
  with pytest.raises(ValueError, match="not in mesh"):
    contrastive_loss(jnp.asarray(zi), jnp.asarray(zt), jnp.float32(0), mesh, batch_axes="fsdp")
