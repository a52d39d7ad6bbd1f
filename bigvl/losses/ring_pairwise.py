"""The (B, B) matrix of a pairwise score between two sharded batches, computed round a ring of
devices: neither side's features are ever gathered.

A score that is not a dot product of two embeddings (DMAE's token-wise interaction compares every
text token with every frame) cannot use the contrastive ring's fused log-sum-exps, but the matrix
itself is small: B×B scalars against B×Nt×d token features. So the ring builds the matrix and the
loss is written on it with plain jnp:

  * device k holds queries x_k (b rows: e.g. texts' tokens, weights, masks) and keys y_k (b rows:
    e.g. videos' frames). The query chunks travel one hop per step (`ppermute`); after n steps
    device k has scored every query chunk against its own keys: the column block S[:, y_k], (B, b).
  * the result is the global (B, B) matrix sharded by columns (`P(None, batch axes)`), which the
    caller's loss reduces along either axis under jit (row log-sum-exps become all-reduces of
    B-vectors, never a gather of features).
  * a `custom_vjp` recomputes each block in the backward pass, streaming the query chunks round the
    ring again with their gradient accumulator travelling along (it comes home after n hops), so
    no rotated chunk is kept alive for the backward pass.

Memory per device: one query chunk in flight (and its gradient accumulator in the backward pass),
the (B, b) column block, and one block's temporaries (for the token-wise score b × b × Nt × Nv
floats); against an all-gather's B × Nt × d of every query feature (and its backward).
Transfers: n − 1 query chunks forward; backward n − 1 query chunks and n hops of their gradient
accumulator (it must come home).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from bigvl.losses.ring import _varying, resolve_batch_axes

PyTree = Any
# score(x, x_const, y, y_const) → (bx, by) float32: x, y differentiable float arrays (pytrees),
# x_const, y_const anything else (masks, ids) that is not differentiated.
Score = Callable[[PyTree, PyTree, PyTree, PyTree], jax.Array]


@dataclasses.dataclass(frozen=True)
class _Plan:
  mesh: Mesh
  axes: tuple[str, ...]
  shards: int

  @property
  def spec(self) -> P:
    return P(self.axes if len(self.axes) > 1 else self.axes[0]) if self.axes else P()

  @property
  def column_spec(self) -> P:
    return P(None, self.spec[0] if self.axes else None)

  def hop(self, x):
    n = self.shards
    return lax.ppermute(x, self.axes, [(i, (i + 1) % n) for i in range(n)]) if n > 1 else x

  def index(self) -> jax.Array:
    """This device's position on the ring (row-major over the batch axes, as `ppermute` counts)."""
    idx = jnp.int32(0)
    for a in self.axes:
      idx = idx * self.mesh.shape[a] + lax.axis_index(a)
    return idx


def _fwd_body(plan: _Plan, score: Score, x, xc, y, yc):
  bx = jax.tree.leaves((x, xc))[0].shape[0]
  by = jax.tree.leaves((y, yc))[0].shape[0]
  me = plan.index()
  cols = jnp.zeros((plan.shards * bx, by), jnp.float32)

  def block(r, chunk, cols):
    src = (me - r) % plan.shards           # whose queries this device holds at step r
    return lax.dynamic_update_slice_in_dim(cols, score(*chunk, y, yc).astype(jnp.float32),
                                           src * bx, 0)

  def step(r, carry):
    chunk, cols = carry
    upcoming = plan.hop(chunk)             # sent before the block: the transfer can overlap it
    return upcoming, block(r, chunk, cols)

  carry = jax.tree.map(lambda v: _varying(v, plan.axes), ((x, xc), cols))
  chunk, cols = lax.fori_loop(0, plan.shards - 1, step, carry)
  return block(plan.shards - 1, chunk, cols)


def _bwd_body(plan: _Plan, score: Score, x, xc, y, yc, dcols):
  bx = jax.tree.leaves((x, xc))[0].shape[0]
  me = plan.index()
  zeros = lambda t: jax.tree.map(lambda v: jnp.zeros(v.shape, jnp.float32), t)

  def block(r, chunk, dx, dy):
    src = (me - r) % plan.shards
    ct = lax.dynamic_slice_in_dim(dcols, src * bx, bx, 0)
    cx, cxc = chunk
    _, vjp = jax.vjp(lambda a, b: score(a, cxc, b, yc).astype(jnp.float32), cx, y)
    gx, gy = vjp(ct)
    add = lambda acc, g: jax.tree.map(lambda u, v: u + v.astype(jnp.float32), acc, g)
    return add(dx, gx), add(dy, gy)

  def step(r, carry):
    chunk, dx, dy = carry
    upcoming = plan.hop(chunk)
    dx, dy = block(r, chunk, dx, dy)
    return upcoming, plan.hop(dx), dy     # the accumulator travels with its chunk

  carry = jax.tree.map(lambda v: _varying(v, plan.axes), ((x, xc), zeros(x), zeros(y)))
  chunk, dx, dy = lax.fori_loop(0, plan.shards - 1, step, carry)
  dx, dy = block(plan.shards - 1, chunk, dx, dy)
  dx = plan.hop(dx)                       # its n-th hop: home
  cast = lambda g, ref: jax.tree.map(lambda a, b: a.astype(b.dtype), g, ref)
  return cast(dx, x), cast(dy, y)


def _mapped(plan: _Plan, body, in_specs, out_specs):
  return jax.shard_map(body, mesh=plan.mesh, in_specs=in_specs, out_specs=out_specs)


def _specs(plan: _Plan, tree) -> PyTree:
  return jax.tree.map(lambda _: plan.spec, tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _matrix(plan: _Plan, score: Score, x, xc, y, yc):
  return _matrix_fwd(plan, score, x, xc, y, yc)[0]


def _matrix_fwd(plan, score, x, xc, y, yc):
  specs = tuple(_specs(plan, t) for t in (x, xc, y, yc))
  out = _mapped(plan, functools.partial(_fwd_body, plan, score), specs, plan.column_spec)(
      x, xc, y, yc)
  return out, (x, xc, y, yc)


def _float0(tree):
  return jax.tree.map(lambda v: jnp.zeros(v.shape, jax.dtypes.float0)
                      if not jnp.issubdtype(v.dtype, jnp.inexact) else jnp.zeros_like(v), tree)


def _matrix_bwd(plan, score, res, ct):
  x, xc, y, yc = res
  specs = tuple(_specs(plan, t) for t in (x, xc, y, yc)) + (plan.column_spec,)
  dx, dy = _mapped(plan, functools.partial(_bwd_body, plan, score), specs,
                   (_specs(plan, x), _specs(plan, y)))(x, xc, y, yc, ct)
  return dx, _float0(xc), dy, _float0(yc)


_matrix.defvjp(_matrix_fwd, _matrix_bwd)


def pairwise_matrix(score: Score, x: PyTree, x_const: PyTree, y: PyTree, y_const: PyTree,
                    mesh: Mesh, *, batch_axes: str | Sequence[str] | None = None) -> jax.Array:
  """S[i, j] = score(query i, key j) over the global batch, (Bx, By) float32 sharded by columns.

  Args:
    score: `score(x, x_const, y, y_const) → (bx, by)` on any number of rows of each side; pure and
      hashable (a module-level function or a `functools.partial` of one with hashable arguments),
      it is a static argument of the compiled program.
    x, x_const: the queries: pytrees of arrays with the batch first, sharded over `batch_axes`;
      `x` is differentiated (float leaves), `x_const` is not (masks, weights from the data).
    y, y_const: the keys, likewise.
    mesh, batch_axes: as `bigvl.losses.contrastive_loss`.
  Equals `score(x, x_const, y, y_const)` on the whole batch (the test oracle), with its gradients.
  """
  axes, n = resolve_batch_axes(mesh, batch_axes)
  for name, tree in (("queries", (x, x_const)), ("keys", (y, y_const))):
    rows = {v.shape[0] for v in jax.tree.leaves(tree)}
    if len(rows) != 1:
      raise ValueError(f"{name}: leaves disagree on the batch size ({sorted(rows)})")
    if rows.pop() % n:
      raise ValueError(f"{name}: batch not divisible by the {n} batch shards of {axes}")
  bad = [jnp.dtype(v.dtype).name for v in jax.tree.leaves((x, y))
         if not jnp.issubdtype(v.dtype, jnp.inexact)]
  if bad:
    raise ValueError(f"differentiated inputs must be float arrays, got {bad}: pass integer "
                     "arrays as x_const / y_const")
  return _matrix(_Plan(mesh, axes, n), score, x, x_const, y, y_const)
