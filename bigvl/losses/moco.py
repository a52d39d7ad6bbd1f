"""A functional MoCo queue and momentum encoder (He et al. 2020), as SNP-S3's global text↔video
contrast uses them (queue 16,384, momentum 0.9999, temperature 0.05 in the authors' configs).

State, a dict of arrays meant for the train state's `extra` (checkpointed with it, so a resumed run
continues bit-exact: every update below is deterministic):
  queue (size, dim): the last `size` keys, a ring buffer; zeros until written.
  count () int32: rows ever written, saturating at size. Writes start at row 0 and go in order, so
    the valid rows are exactly [0, count) until the ring first wraps, and all rows after.
  ptr () int32: the next row to write.
MoCo's reference code fills the queue with random unit vectors and uses them as negatives from step
one; here never-written rows are masked out of the loss instead (`valid_rows`).

  enqueue:    queue[(ptr + b) mod size] ← keys_b, b = 0..B−1;  ptr ← (ptr + B) mod size;
              count ← min(count + B, size). B may be anything ≤ size: a write that runs past the
              end wraps to row 0 (one scatter), so size need not be a multiple of the global batch.
  momentum:   ema ← m·ema + (1 − m)·params, leaf by leaf (after N steps with fixed params:
              ema_N = mᴺ·ema_0 + (1 − mᴺ)·params).
  queue_contrastive (InfoNCE of query i, positive key i, the valid queue rows as negatives):
              loss_i = LSE([⟨q_i, k_i⟩, ⟨q_i, Q_r⟩ for valid r] / τ) − ⟨q_i, k_i⟩/τ
Order in a step, as MoCo: the loss uses the queue as it was, then the step enqueues the new keys.
Keys and queue rows get no gradient (stop_gradient): they come from the momentum encoder.

Sharding. The batch (q, k) may be sharded over the mesh; the queue is replicated, which is what the
loop's `_extra_shardings` gives any extra leaf that is not shaped like a parameter. Memory per
device: size·dim·itemsize, 16,384 × 256 × 4 B = 16 MiB in float32 (half in bfloat16), plus the
(B_local, size) logits of the loss. Everything is plain jnp under jit, so a queue sharded along
its size axis also works (XLA all-reduces the row log-sum-exps); that only pays for queues far
larger than SNP-S3's. `enqueue` of sharded keys all-gathers the B×dim keys (small) into every copy.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

_F32 = jnp.float32
_NEG = -1e30   # logit of a masked queue row: exp() is 0, every max/log stays finite

PyTree = Any


def init_queue(size: int, dim: int, dtype=jnp.float32) -> dict[str, jax.Array]:
  """An empty queue: {"queue": zeros (size, dim), "count": 0, "ptr": 0} (int32 scalars)."""
  if size < 1 or dim < 1:
    raise ValueError(f"queue size={size} and dim={dim} must be >= 1")
  return {"queue": jnp.zeros((size, dim), dtype), "count": jnp.zeros((), jnp.int32),
          "ptr": jnp.zeros((), jnp.int32)}


def valid_rows(state: dict[str, jax.Array]) -> jax.Array:
  """(size,) bool: the rows that hold a key (rows [0, count))."""
  return jnp.arange(state["queue"].shape[0]) < state["count"]


def enqueue(state: dict[str, jax.Array], keys: jax.Array) -> dict[str, jax.Array]:
  """Writes the B rows of `keys` (B, dim) at ptr, wrapping round the end → the new state."""
  queue = state["queue"]
  size, dim = queue.shape
  if keys.ndim != 2 or keys.shape[1] != dim:
    raise ValueError(f"keys {keys.shape} must be (B, {dim}) for a queue of {queue.shape}")
  b = keys.shape[0]
  if b > size:
    raise ValueError(f"keys batch B={b} exceeds the queue size {size}: a step would overwrite "
                     f"its own keys")
  keys = jax.lax.stop_gradient(keys).astype(queue.dtype)
  ptr = state["ptr"].astype(jnp.int32)
  rows = (ptr + jnp.arange(b, dtype=jnp.int32)) % size
  return {"queue": queue.at[rows].set(keys, unique_indices=True, mode="promise_in_bounds"),
          "count": jnp.minimum(state["count"] + b, size).astype(jnp.int32),
          "ptr": ((ptr + b) % size).astype(jnp.int32)}


def momentum_update(ema_params: PyTree, params: PyTree, momentum) -> PyTree:
  """m·ema + (1 − m)·params leaf by leaf, in float32, cast back to each ema leaf's dtype; no
  gradient flows into the result."""
  def one(e, p):
    e32, p32 = e.astype(_F32), jax.lax.stop_gradient(p).astype(_F32)
    return (momentum * e32 + (1.0 - momentum) * p32).astype(e.dtype)
  return jax.tree.map(one, ema_params, params)


def queue_contrastive(q: jax.Array, k: jax.Array, queue: jax.Array, valid: jax.Array | None,
                      temperature) -> tuple[jax.Array, dict[str, jax.Array]]:
  """InfoNCE of queries `q` (B, d) with positives `k` (B, d) and the `valid` rows of `queue`
  (size, d) as negatives → (loss, aux).

  `valid` (size,) bool or None (all rows count); q, k and the queue are used as given (the model
  L2-normalises them). aux: "acc" (positive above every valid negative), "negatives" (valid rows).
  """
  if q.shape != k.shape or q.ndim != 2 or queue.ndim != 2 or queue.shape[1] != q.shape[1]:
    raise ValueError(f"q {q.shape}, k {k.shape} must be (B, d) and queue {queue.shape} (size, d)")
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise ValueError(f"temperature={temperature} must be > 0")
  if valid is None:
    valid = jnp.ones(queue.shape[:1], bool)
  elif valid.shape != queue.shape[:1]:
    raise ValueError(f"valid {valid.shape} must be ({queue.shape[0]},)")
  q32 = q.astype(_F32)
  k32 = jax.lax.stop_gradient(k).astype(_F32)
  pos = jnp.sum(q32 * k32, axis=1) / temperature                                   # (B,)
  neg = jnp.einsum("bd,rd->br", q32, jax.lax.stop_gradient(queue).astype(_F32)) / temperature
  neg = jnp.where(valid[None, :], neg, _NEG)
  lse = jnp.logaddexp(pos, jax.nn.logsumexp(neg, axis=1))
  loss = jnp.mean(lse - pos)
  aux = {"acc": jnp.mean(pos > jnp.max(neg, axis=1)),
         "negatives": jnp.sum(valid.astype(jnp.int32))}
  return loss, aux


def batch_and_queue_contrastive(q: jax.Array, k: jax.Array, queue: jax.Array,
                                valid: jax.Array | None, temperature
                                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """InfoNCE of query i with positive key i, and as negatives the batch's other keys and the
  `valid` queue rows (the form ALBEF and video–text MoCo variants use; `queue_contrastive` is
  MoCo's queue-only one):
    loss_i = LSE([⟨q_i, k_j⟩ for all j] ∪ [⟨q_i, Q_r⟩ for valid r] / τ) − ⟨q_i, k_i⟩/τ
  q, k (B, d) (the batch may be sharded: the (B, B) block gathers the B keys), queue (size, d).
  aux: "acc" (the positive above every negative)."""
  if q.shape != k.shape or q.ndim != 2 or queue.ndim != 2 or queue.shape[1] != q.shape[1]:
    raise ValueError(f"q {q.shape}, k {k.shape} must be (B, d) and queue {queue.shape} (size, d)")
  if valid is None:
    valid = jnp.ones(queue.shape[:1], bool)
  q32 = q.astype(_F32)
  k32 = jax.lax.stop_gradient(k).astype(_F32)
  in_batch = jnp.einsum("bd,cd->bc", q32, k32) / temperature                          # (B, B)
  neg = jnp.einsum("bd,rd->br", q32, jax.lax.stop_gradient(queue).astype(_F32)) / temperature
  neg = jnp.where(valid[None, :], neg, _NEG)
  pos = jnp.diagonal(in_batch)
  lse = jnp.logaddexp(jax.nn.logsumexp(in_batch, axis=1), jax.nn.logsumexp(neg, axis=1))
  others = jnp.where(jnp.eye(q.shape[0], dtype=bool), _NEG, in_batch)
  best = jnp.maximum(jnp.max(others, axis=1), jnp.max(neg, axis=1))
  return jnp.mean(lse - pos), {"acc": jnp.mean(pos > best)}
