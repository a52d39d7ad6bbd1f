"""Symmetric InfoNCE over a sharded batch by a ring of `ppermute`s: no all-gather, O(b·d) memory.

Each of the n batch shards holds b image rows and b text rows. Only the text embeddings travel: at
every ring step a device multiplies its local images with the text chunk it holds (one b×b block,
tiled by rows), which updates both the running log-sum-exp of its own image rows and a column
log-sum-exp that rides along with the text chunk, so each block is computed once for both
directions ("fused bidirectional ring"). A `custom_vjp` recomputes the blocks in the backward pass
by streaming the texts round the ring again, with the text gradient accumulator travelling along;
plain autodiff through the ring would keep every rotated chunk alive and save nothing.

Transfers per device, forward + backward: (3g − 2)·b·d elements (3g − 3 when both passes are in one
program: XLA reuses the forward's first text hop), plus O(g·b) for the log-sum-exp vectors, against
4(g − 1)·b·d for all-gather-with-gradient. The only all-reduces are scalars. Temporaries are
O(block_rows·b + b·d) per device: the b×b block is never materialised whole.

Groups (M²-Encoder's grouped aggregation): the n shards are cut into contiguous runs of g; each run
is a separate contrastive problem and the ring never leaves it. Keep a group inside a host / ICI
slice by making the batch axes host-major (the default device order does this).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from bigvl.parallel import mesh as mesh_lib

_F32 = jnp.float32
# Logit given to padded rows: exp() of it is 0, and unlike -inf it keeps every max/log finite.
_PAD_LOGIT = -1e30
DEFAULT_BLOCK_ROWS = 256


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static description of one ring loss (hashable: it is a non-differentiable custom_vjp arg)."""
  mesh: Mesh
  axes: tuple[str, ...]    # mesh axes the batch is sharded over (row-major = ring index order)
  shards: int              # n
  group: int               # g
  block_rows: int          # row tile of a b×b block

  @property
  def spec(self) -> P:
    return P(self.axes if len(self.axes) > 1 else self.axes[0]) if self.axes else P()

  def hop(self, x):
    """Sends x one step round the ring of its group: shard i → next shard of i's group."""
    g = self.group
    perm = [(i, (i // g) * g + (i % g + 1) % g) for i in range(self.shards)]
    return lax.ppermute(x, self.axes, perm)


@dataclasses.dataclass(frozen=True)
class _Tiles:
  """Row tiling of the local b rows: `count` tiles of `rows`, the last one padded."""
  b: int
  rows: int
  count: int

  @classmethod
  def make(cls, b: int, block_rows: int) -> "_Tiles":
    count = -(-b // max(1, block_rows))
    return cls(b, -(-b // count), count)

  @property
  def padded(self) -> int:
    return self.rows * self.count

  def pad(self, x: jax.Array) -> jax.Array:
    extra = self.padded - self.b
    return x if not extra else jnp.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1))


def _default_batch_axes(mesh: Mesh) -> tuple[str, ...]:
  # The mesh axes that DEFAULT_RULES shards "batch" over; a mesh without them (e.g. one ad-hoc axis
  # in a benchmark) is treated as pure data parallelism.
  return mesh_lib.batch_axes(mesh_lib.DEFAULT_RULES, mesh.axis_names) or tuple(mesh.axis_names)


def resolve_batch_axes(mesh: Mesh, batch_axes: str | Sequence[str] | None
                       ) -> tuple[tuple[str, ...], int]:
  """(the ring's mesh axes, the number of batch shards) of a `batch_axes` argument: None gives
  `_default_batch_axes`; an axis the mesh lacks is a one-line error."""
  axes = _default_batch_axes(mesh) if batch_axes is None else (
      (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes))
  unknown = [a for a in axes if a not in mesh.axis_names]
  if unknown:
    raise ValueError(f"batch_axes {axes}: {unknown} not in mesh axes {mesh.axis_names}")
  return axes, math.prod(mesh.shape[a] for a in axes)


def _varying(x, axes: tuple[str, ...]):
  """Marks loop-carried initial values as varying over the ring axes (shard_map's vma check)."""
  aval = jax.typeof(x)
  varying = aval.mat.varying if hasattr(aval, "mat") else aval.vma  # newer jax / older jax
  missing = tuple(a for a in axes if a not in varying)
  return lax.pcast(x, missing, to="varying") if missing else x


def _logits(t: jax.Array, zi: jax.Array, zt: jax.Array) -> jax.Array:
  return t * lax.dot_general(zi, zt, (((1,), (1,)), ((), ())), preferred_element_type=_F32)


def _lse(s: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """(log-sum-exp, max) along `axis`; logits are finite (padding is _PAD_LOGIT), so no inf care."""
  m = jnp.max(s, axis=axis)
  return m + jnp.log(jnp.sum(jnp.exp(s - jnp.expand_dims(m, axis)), axis=axis)), m


def _fwd_block(plan: _Plan, tiles: _Tiles, t, zi_p, zt, rows, cols, with_diag: bool):
  """Folds the block (local images × the text chunk `zt`) into the row and column statistics.

  rows = (lse, max, diag) of the padded local image rows; cols = (2, b) [lse; max] of the chunk's
  columns, one array so that each hop is one collective.
  """
  def tile(c, carry):
    (r_lse, r_max, diag), cols = carry
    start = c * tiles.rows
    s = _logits(t, lax.dynamic_slice_in_dim(zi_p, start, tiles.rows), zt)     # (rows, b)
    if tiles.padded != tiles.b:
      valid = start + jnp.arange(tiles.rows) < tiles.b
      s = jnp.where(valid[:, None], s, _PAD_LOGIT)
    if with_diag:  # Positive pair of local row start+a is local column start+a (same matmul).
      idx = jnp.minimum(start + jnp.arange(tiles.rows), tiles.b - 1)
      diag = lax.dynamic_update_slice_in_dim(
          diag, jnp.take_along_axis(s, idx[:, None], axis=1)[:, 0], start, 0)
    lse, mx = _lse(s, 1)
    r_lse = lax.dynamic_update_slice_in_dim(
        r_lse, jnp.logaddexp(lax.dynamic_slice_in_dim(r_lse, start, tiles.rows), lse), start, 0)
    r_max = lax.dynamic_update_slice_in_dim(
        r_max, jnp.maximum(lax.dynamic_slice_in_dim(r_max, start, tiles.rows), mx), start, 0)
    lse, mx = _lse(s, 0)
    return (r_lse, r_max, diag), jnp.stack([jnp.logaddexp(cols[0], lse), jnp.maximum(cols[1], mx)])

  carry = jax.tree.map(lambda x: _varying(x, plan.axes), (rows, cols))
  return lax.fori_loop(0, tiles.count, tile, carry)


def _ring(plan: _Plan, block, chunk, moving, state):
  """Runs `block` once per chunk of the group, starting with the local one; returns (moving, state).

  block(chunk, moving, state, first) → (moving, state). `chunk` (read-only, e.g. the texts) is sent
  on *before* the block that uses it, so the transfer can overlap the block's compute; `moving`
  (the chunk's accumulators) is sent on after the block updates it and comes home at the end. The
  chunk makes g − 1 hops, the accumulators g.
  """
  if plan.group == 1:
    return block(chunk, moving, state, True)
  upcoming = plan.hop(chunk)
  moving, state = block(chunk, moving, state, True)
  moving = plan.hop(moving)

  def step(_, carry):
    chunk, moving, state = carry
    upcoming = plan.hop(chunk)
    moving, state = block(chunk, moving, state, False)
    return upcoming, plan.hop(moving), state

  chunk, moving, state = lax.fori_loop(0, plan.group - 2, step, (upcoming, moving, state))
  moving, state = block(chunk, moving, state, False)
  return plan.hop(moving), state


def _fwd_body(plan: _Plan, zi, zt, scale):
  """Per-shard forward: returns the global loss, metrics and the residual log-sum-exps."""
  b = zi.shape[0]
  tiles = _Tiles.make(b, plan.block_rows)
  t = jnp.exp(scale.reshape(()).astype(_F32))
  zi_p = tiles.pad(zi)
  neg = lambda n: jnp.full((n,), -jnp.inf, _F32)
  rows = (neg(tiles.padded), neg(tiles.padded), jnp.zeros((tiles.padded,), _F32))

  def block(zt_k, cols, rows, first):
    rows, cols = _fwd_block(plan, tiles, t, zi_p, zt_k, rows, cols, with_diag=first)
    return cols, rows

  cols, rows = _ring(plan, block, zt, jnp.full((2, b), -jnp.inf, _F32), rows)
  (r_lse, r_max, diag), (c_lse, c_max) = jax.tree.map(lambda x: x[:b], rows), tuple(cols)

  total = plan.shards * b
  mean = lambda x: lax.psum(jnp.sum(x), plan.axes) / total   # Scalar all-reduces only.
  metrics = {
      "loss_i2t": mean(r_lse - diag),
      "loss_t2i": mean(c_lse - diag),
      # argmax == positive ⇔ the positive reaches the max (exact ties count as correct).
      "acc_i2t": mean((diag >= r_max).astype(_F32)),
      "acc_t2i": mean((diag >= c_max).astype(_F32)),
  }
  loss = 0.5 * (metrics["loss_i2t"] + metrics["loss_t2i"])
  return loss, metrics, r_lse, c_lse


def _bwd_block(plan: _Plan, tiles: _Tiles, t, coef, zi_p, r_lse_p, zt, c_lse, acc):
  """Adds the block's contributions to (d zi_p, d zt of the chunk, d scale).

  d loss / d logit_ij = coef · (softmax_row_ij + softmax_col_ij) off the positive pairs.
  """
  def tile(c, carry):
    dzi, dzt, ds = carry
    start = c * tiles.rows
    zi_c = lax.dynamic_slice_in_dim(zi_p, start, tiles.rows)
    s = _logits(t, zi_c, zt)
    r = lax.dynamic_slice_in_dim(r_lse_p, start, tiles.rows)
    g = coef * (jnp.exp(s - r[:, None]) + jnp.exp(s - c_lse[None, :]))
    if tiles.padded != tiles.b:
      g = jnp.where((start + jnp.arange(tiles.rows) < tiles.b)[:, None], g, 0.0)
    ds = ds + jnp.sum(g * s)
    g = g.astype(zt.dtype)  # bf16 inputs: bf16 matmul operands, float32 accumulation.
    dzi_c = t * jnp.dot(g, zt, preferred_element_type=_F32)
    dzi = lax.dynamic_update_slice_in_dim(
        dzi, lax.dynamic_slice_in_dim(dzi, start, tiles.rows) + dzi_c, start, 0)
    dzt = dzt + t * lax.dot_general(g, zi_c, (((0,), (0,)), ((), ())),
                                    preferred_element_type=_F32)
    return dzi, dzt, ds

  acc = jax.tree.map(lambda x: _varying(x, plan.axes), acc)
  return lax.fori_loop(0, tiles.count, tile, acc)


def _bwd_body(plan: _Plan, zi, zt, scale, r_lse, c_lse, ct):
  b, d = zi.shape
  tiles = _Tiles.make(b, plan.block_rows)
  t = jnp.exp(scale.reshape(()).astype(_F32))
  coef = ct.astype(_F32) / (2 * plan.shards * b)
  zi_p, r_lse_p = tiles.pad(zi), tiles.pad(r_lse)
  zeros = lambda *s: jnp.zeros(s, _F32)

  def block(chunk, dzt_k, acc, first):
    del first
    dzi, dzt_k, ds = _bwd_block(plan, tiles, t, coef, zi_p, r_lse_p, *chunk,
                                (acc[0], dzt_k, acc[1]))
    return dzt_k, (dzi, ds)

  # The text gradient accumulator rides with its chunk and comes home having seen the whole group.
  dzt, (dzi, ds) = _ring(plan, block, (zt, c_lse), zeros(b, d), (zeros(tiles.padded, d), zeros()))
  # The positive pairs' −logit_ii terms, kept out of the blocks so that every block is alike.
  zi32, zt32 = zi.astype(_F32), zt.astype(_F32)
  dzi = dzi[:b] - 2 * coef * t * zt32
  dzt = dzt - 2 * coef * t * zi32
  ds = ds - 2 * coef * t * jnp.sum(zi32 * zt32)
  ds = lax.psum(ds, plan.axes)  # The temperature is replicated: its cotangent sums all shards.
  return dzi.astype(zi.dtype), dzt.astype(zt.dtype), ds.astype(scale.dtype).reshape(scale.shape)


def _shard_map(plan: _Plan, body, in_specs, out_specs):
  return jax.shard_map(functools.partial(body, plan), mesh=plan.mesh, in_specs=in_specs,
                       out_specs=out_specs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_loss(plan: _Plan, zimg, ztxt, logit_scale):
  return _ring_loss_fwd(plan, zimg, ztxt, logit_scale)[0]


def _ring_loss_fwd(plan: _Plan, zimg, ztxt, logit_scale):
  s = plan.spec
  loss, metrics, r_lse, c_lse = _shard_map(plan, _fwd_body, (s, s, P()), (P(), P(), s, s))(
      zimg, ztxt, logit_scale)
  return (loss, metrics), (zimg, ztxt, logit_scale, r_lse, c_lse)


def _ring_loss_bwd(plan: _Plan, res, cts):
  ct_loss, _ = cts  # The metrics are not differentiated.
  s = plan.spec
  return _shard_map(plan, _bwd_body, (s, s, P(), s, s, P()), (s, s, P()))(*res, ct_loss)


_ring_loss.defvjp(_ring_loss_fwd, _ring_loss_bwd)


def contrastive_loss(zimg: jax.Array, ztxt: jax.Array, logit_scale: jax.Array, mesh: Mesh, *,
                     batch_axes: str | Sequence[str] | None = None, group_size: int | None = None,
                     block_rows: int = DEFAULT_BLOCK_ROWS
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Symmetric InfoNCE of pairs (zimg[i], ztxt[i]) over a batch sharded on `mesh`, all-gather-free.

  Equals `dense_contrastive_loss` when group_size is the number of batch shards (the default);
  otherwise it is the mean of the per-group dense losses, a group being `group_size` consecutive
  shards of the batch.

  Args:
    zimg: (B, d) image embeddings, float32 or bfloat16 (the loss accumulates in float32).
    ztxt: (B, d) text embeddings, same dtype.
    logit_scale: scalar (any shape of size 1); the logits are exp(logit_scale) · zimg @ ztxtᵀ.
    mesh: the device mesh.
    batch_axes: mesh axes that shard the batch, in ring order; default: those DEFAULT_RULES maps
      "batch" to that exist in `mesh`, or every mesh axis if none does.
    group_size: g shards per contrastive group; must divide the number of batch shards n.
    block_rows: row tile of each b×b block; bounds the temporaries to O(block_rows·b + b·d).
  Returns:
    (loss, metrics) with float32 scalars: loss_i2t, loss_t2i, acc_i2t, acc_t2i (the same keys as
    `dense_contrastive_loss`). Differentiable w.r.t. zimg, ztxt and logit_scale.
  """
  axes, n = resolve_batch_axes(mesh, batch_axes)
  g = n if group_size is None else int(group_size)
  if g < 1 or n % g:
    raise ValueError(f"group_size={group_size} must divide the {n} batch shards of axes {axes}")
  if zimg.ndim != 2 or zimg.shape != ztxt.shape or zimg.dtype != ztxt.dtype:
    raise ValueError(f"zimg {zimg.shape} {zimg.dtype} and ztxt {ztxt.shape} {ztxt.dtype}: want two "
                     "(B, d) arrays of one dtype")
  if zimg.shape[0] % n:
    raise ValueError(f"batch {zimg.shape[0]} is not divisible by the {n} batch shards of {axes}")
  if block_rows < 1:
    raise ValueError(f"block_rows={block_rows} must be positive")
  plan = _Plan(mesh=mesh, axes=axes, shards=n, group=g, block_rows=int(block_rows))
  return _ring_loss(plan, zimg, ztxt, jnp.asarray(logit_scale))
