"""GradCache batch accumulation: K micro-batches give the loss and gradients of one K× batch."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from bigvl.losses import accumulate, contrastive_loss, dense_contrastive_loss
from bigvl.parallel import mesh as mesh_lib


def _mesh(n: int) -> jax.sharding.Mesh:
  if jax.device_count() < n:
    pytest.skip(f"needs {n} devices, have {jax.device_count()}: run with "
                "XLA_FLAGS=--xla_force_host_platform_device_count=8")
  return mesh_lib.make_mesh({"data": n}, jax.devices()[:n])


def _params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"wi": jax.random.normal(k1, (6, 8)), "wt": jax.random.normal(k2, (5, 8)),
          "logit_scale": jnp.float32(math.log(1 / 0.07))}


def _batch(rows: int):
  rng = np.random.default_rng(rows)
  return {"image": rng.standard_normal((rows, 6)).astype(np.float32),
          "text": rng.standard_normal((rows, 5)).astype(np.float32)}


def embed(params, batch):
  norm = lambda z: z / jnp.linalg.norm(z, axis=-1, keepdims=True)
  return (norm(jnp.tanh(batch["image"] @ params["wi"])),
          norm(jnp.tanh(batch["text"] @ params["wt"])))


def _assert_same(a, b, rtol=1e-5):
  (loss_a, aux_a), grads_a = a
  (loss_b, aux_b), grads_b = b
  np.testing.assert_allclose(loss_a, loss_b, rtol=rtol)
  for k in aux_b:
    np.testing.assert_allclose(aux_a[k], aux_b[k], rtol=rtol, atol=1e-7)
  for ga, gb in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    scale = float(np.max(np.abs(gb)))
    np.testing.assert_allclose(ga, gb, rtol=rtol, atol=rtol * scale)


def test_split_and_merge_are_inverse_and_shard_local():
  x = np.arange(24)
  micro = accumulate.split_micro_batches(x, 3, num_shards=2)
  # Shard 0 holds rows 0..11, shard 1 rows 12..23; micro-batch k takes the k-th 4 of each.
  np.testing.assert_array_equal(micro[0], [0, 1, 2, 3, 12, 13, 14, 15])
  np.testing.assert_array_equal(accumulate.merge_micro_batches(micro, num_shards=2), x)
  with pytest.raises(ValueError, match="micro-batches"):
    accumulate.split_micro_batches(x, 5)


def test_dense_loss_single_device():
  params, batch = _params(), _batch(24)
  loss_fn = lambda p, e: dense_contrastive_loss(e[0], e[1], p["logit_scale"])
  big = jax.value_and_grad(lambda p: loss_fn(p, embed(p, batch)), has_aux=True)(params)
  for k in (1, 2, 4):
    got = jax.jit(lambda p, b, k=k: accumulate.accumulated_value_and_grad(
        embed, loss_fn, p, b, k))(params, batch)
    _assert_same(got, big)


@pytest.mark.parametrize("group_size", [8, 4])
def test_ring_loss_on_8_devices_equals_one_big_step(group_size):
  mesh = _mesh(8)
  rows = NamedSharding(mesh, P("data"))
  params, batch = _params(), _batch(8 * 4 * 3)   # 8 shards × K=4 micro-batches × 3 rows
  batch = jax.device_put(batch, rows)
  loss_fn = lambda p, e: contrastive_loss(e[0], e[1], p["logit_scale"], mesh,
                                          group_size=group_size)

  def step(k):
    return jax.jit(lambda p, b: accumulate.accumulated_value_and_grad(
        embed, loss_fn, p, b, k, num_shards=8))

  big = step(1)(params, batch)
  _assert_same(step(4)(params, batch), big)
  # The oracle of the oracle: the grouped loss of the big batch is the mean of the dense group
  # losses (groups = consecutive rows, since the batch is sharded contiguously).
  zi, zt = embed(params, jax.device_get(batch))
  n = 8 * 4 * 3 * group_size // 8
  dense = np.mean([dense_contrastive_loss(zi[i:i + n], zt[i:i + n], params["logit_scale"])[0]
                   for i in range(0, len(zi), n)])
  np.testing.assert_allclose(big[0][0], dense, rtol=1e-5)

  hlo = step(4).lower(params, batch).compile().as_text()
  # The micro-batch split and the merge of the embeddings move no rows between devices.
  assert not re.search(r"\s(all-to-all|all-gather)(-start)?\(", hlo)
