"""Batch accumulation for losses over a whole batch of embeddings (GradCache).

A contrastive loss couples every pair in the batch, so plain gradient accumulation (summing
per-micro-batch gradients) would shrink the set of negatives. GradCache keeps the full contrastive
batch with the activation memory of one micro-batch:

  1. embed the K micro-batches without differentiating (no activations kept);
  2. compute the loss on all embeddings together and its gradient w.r.t. the embeddings (and w.r.t.
     parameters the loss uses directly, such as the temperature);
  3. for each micro-batch, recompute the forward pass and backpropagate its slice of the cached
     embedding gradient; sum the parameter gradients.

The result equals one step on the K-times-larger batch (up to float summation order); the price is
one extra forward pass per micro-batch.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import jax
import jax.numpy as jnp
from jax import lax

PyTree = Any
Aux = TypeVar("Aux")


def split_micro_batches(batch: PyTree, accum_steps: int, num_shards: int = 1) -> PyTree:
  """(B, ...) leaves → (K, B/K, ...), each shard's rows split locally.

  With the batch sharded in `num_shards` contiguous pieces along its first axis, micro-batch k takes
  the k-th slice of every shard's rows, so no row changes device, and a micro-batch is sharded like
  the batch. Inverse: `merge_micro_batches`.
  """
  def split(x):
    total = x.shape[0]
    if total % (accum_steps * num_shards):
      raise ValueError(f"batch of {total} rows does not split into {accum_steps} micro-batches "
                       f"over {num_shards} shards")
    b = total // (accum_steps * num_shards)
    x = x.reshape(num_shards, accum_steps, b, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape(accum_steps, num_shards * b, *x.shape[3:])
  return jax.tree.map(split, batch)


def merge_micro_batches(stacked: PyTree, num_shards: int = 1) -> PyTree:
  """(K, M, ...) → (K·M, ...) in the row order of the batch that `split_micro_batches` split."""
  def merge(x):
    k, m = x.shape[:2]
    x = x.reshape(k, num_shards, m // num_shards, *x.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape(k * m, *x.shape[3:])
  return jax.tree.map(merge, stacked)


def accumulated_value_and_grad(
    embed_fn: Callable[[PyTree, PyTree], PyTree],
    loss_fn: Callable[[PyTree, PyTree], tuple[jax.Array, Aux]],
    params: PyTree,
    batch: PyTree,
    accum_steps: int,
    *,
    num_shards: int = 1,
) -> tuple[tuple[jax.Array, Aux], PyTree]:
  """value_and_grad(has_aux=True) of params ↦ loss_fn(params, embed_fn(params, batch)), in K parts.

  Args:
    embed_fn: (params, micro_batch) → embeddings, a pytree of arrays whose first axis is the rows of
      the micro-batch. Must be deterministic: it runs twice per micro-batch (pass dropout keys in
      the batch if needed).
    loss_fn: (params, embeddings of the whole batch) → (loss, aux). It may use params directly
      (e.g. the logit scale); those gradients are included.
    params: the differentiated parameters.
    batch: pytree of (B, ...) arrays; B must be divisible by accum_steps · num_shards.
    accum_steps: K; 1 is a plain value_and_grad.
    num_shards: how many contiguous shards the batch's rows are split over (the data-parallel size);
      makes the micro-batch split device-local. It also keeps the embeddings in the batch's row
      order, which a grouped loss relies on. Any value gives a correct result for a loss that is
      invariant to permuting the pairs (exact global InfoNCE), only with more data movement.
  Returns:
    ((loss, aux), grads), as jax.value_and_grad(..., has_aux=True) on the whole batch would.
  """
  if accum_steps < 1:
    raise ValueError(f"accum_steps={accum_steps} must be >= 1")
  if accum_steps == 1:
    return jax.value_and_grad(lambda p: loss_fn(p, embed_fn(p, batch)), has_aux=True)(params)

  micro = split_micro_batches(batch, accum_steps, num_shards)
  # 1. Embeddings of every micro-batch; nothing is differentiated, so no activations are kept.
  stacked = lax.map(lambda mb: embed_fn(params, mb), micro)
  # 2. The loss over the whole batch and its gradient w.r.t. the embeddings (and direct params).
  (loss, aux), (grads, emb_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
      params, merge_micro_batches(stacked, num_shards))
  emb_grads = split_micro_batches(emb_grads, accum_steps, num_shards)

  # 3. Recompute each micro-batch's forward pass and pull its cached embedding gradient back.
  def backprop(acc, xs):
    mb, cotangent = xs
    _, vjp = jax.vjp(lambda p: embed_fn(p, mb), params)
    return jax.tree.map(jnp.add, acc, vjp(cotangent)[0]), None

  grads, _ = lax.scan(backprop, grads, (micro, emb_grads))
  return (loss, aux), grads
