"""Contrastive-loss implementations side by side, in one process on N devices.

  XLA_FLAGS are set by this script: python launch/bench_loss.py --devices 8 --dim 512 \
      --batch 4096,8192,16384 --json /tmp/bench_loss.jsonl

Implementations (all exact symmetric InfoNCE, forward + backward w.r.t. both embeddings and the
logit scale):
  naive      all-gather both sides (no gradient through the gather: each device differentiates only
             its own rows, as open_clip's default does), full B×B logits on every device.
  open_clip  open_clip's `local_loss=True, gather_with_grad=True`: all-gather with gradient
             (reduce-scatter backward), b×B logits for each direction.
  ring       bigvl.losses.contrastive_loss, one group of all N devices.
  grouped    the same with group_size = N/2 (a different loss: the mean of the two groups' losses).

Per implementation and batch: per-device temporary bytes of the compiled program
(`memory_analysis().temp_size_in_bytes`), bytes received per device and number of collectives
executed, both read from the compiled HLO with while-loop trip counts, median wall time of one
forward+backward, and the max gradient error against a float64 numpy oracle (max |Δ| / max |oracle|,
worst of d zimg, d ztxt, d logit_scale). Runs on N fake CPU devices unless the default backend has
at least N (or, without --devices, at least 2) accelerators.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from typing import Any, Callable, Iterable

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ("naive", "open_clip", "ring", "grouped")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_COLLECTIVE = re.compile(r"^\s*(?:ROOT\s+)?%?(\S+)\s*=\s*(.*?)\s(all-gather|all-reduce|"
                         r"reduce-scatter|collective-permute|all-to-all)(-start)?\(")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


# ---------------------------------------------------------------------------- compiled-HLO analysis
def _shapes_bytes(text: str) -> list[int]:
  return [_DTYPE_BYTES[t] * math.prod(int(x) for x in dims.split(",") if x)
          for t, dims in _SHAPE.findall(text)]


def _group_size(line: str, num_devices: int) -> int:
  m = re.search(r"replica_groups=\[[\d,]*?(\d+)\]<=", line)   # iota form [groups,size]<=[n]
  if m:
    return int(m.group(1))
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  return len(m.group(1).split(",")) if m and m.group(1) else num_devices


def collectives(hlo: str, num_devices: int) -> dict[str, Any]:
  """Collectives of a compiled (post-SPMD, per-device) HLO module, weighted by loop trip counts.

  Bytes received per device: all-gather (k−1)/k of its output, reduce-scatter (k−1)/k of its input,
  all-reduce 2(k−1)/k of its operand (ring algorithm), all-to-all (k−1)/k, collective-permute its
  operand; k = replica group size. Returns {"count", "recv_bytes", "static_count", "by_kind":
  {kind: {"count", "recv_bytes", "max_operand_bytes"}}}.
  """
  comps: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo.splitlines():
    m = _HEADER.match(line)
    if m and not line.startswith(" "):
      current = m.group(2)
      comps[current] = []
      entry = current if m.group(1) else entry
    elif line.startswith("}"):
      current = None
    elif current is not None:
      comps[current].append(line)
  out = {"count": 0, "recv_bytes": 0, "static_count": 0, "by_kind": {}}

  def visit(name: str, mult: int, depth: int = 0):
    for line in comps.get(name, ()):
      m = _COLLECTIVE.match(line)
      if m:
        kind, is_async = m.group(3), bool(m.group(4))
        sizes = _shapes_bytes(m.group(2))
        # Async starts return (operands, outputs, ...): the largest is the gathered output, the
        # first the permuted operand.
        if is_async:
          size = sizes[0] if kind == "collective-permute" else max(sizes)
        else:
          size = sum(sizes)
        k = _group_size(line, num_devices)
        recv = {"all-gather": size * (k - 1) / k, "reduce-scatter": size * (k - 1),
                "all-reduce": 2 * size * (k - 1) / k, "all-to-all": size * (k - 1) / k,
                "collective-permute": size}[kind]
        operand = size * k if kind == "reduce-scatter" else size
        rec = out["by_kind"].setdefault(kind, {"count": 0, "recv_bytes": 0, "max_operand_bytes": 0})
        rec["count"] += mult
        rec["recv_bytes"] += int(recv * mult)
        rec["max_operand_bytes"] = max(rec["max_operand_bytes"], operand)
        out["count"] += mult
        out["recv_bytes"] += int(recv * mult)
        out["static_count"] += 1
      if depth > 50:
        continue
      w = re.search(r"\bwhile\(.*?body=%?([\w.\-]+)", line)
      if w:
        n = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        visit(w.group(1), mult * (int(n.group(1)) if n else 1), depth + 1)
        continue
      for callee in re.findall(r"\b(?:calls|branch_computations)=\{?([%\w.\-, ]+)\}?", line):
        for c in callee.split(","):
          if "fused" not in c:  # Fusions hold no collectives; skipping them keeps this fast.
            visit(c.strip().lstrip("%"), mult, depth + 1)

  if entry:
    visit(entry, 1)
  return out


# ---------------------------------------------------------------------------- float64 oracle
def oracle(zimg: np.ndarray, ztxt: np.ndarray, logit_scale: float, groups: int = 1,
           chunk: int = 2048) -> tuple[float, np.ndarray, np.ndarray, float]:
  """(loss, d zimg, d ztxt, d logit_scale) in float64: the mean of the groups' dense InfoNCE.

  Groups are consecutive equal slices of the batch. Row-chunked, so B×B is never held.
  """
  zi, zt = zimg.astype(np.float64), ztxt.astype(np.float64)
  big_b = len(zi)
  t = math.exp(logit_scale)
  coef = 1.0 / (2 * big_b)   # loss = Σ_groups Σ_rows (...) / (2B) since groups are equal-sized
  loss, dscale = 0.0, 0.0
  dzi, dzt = np.zeros_like(zi), np.zeros_like(zt)
  size = big_b // groups
  for g0 in range(0, big_b, size):
    a, b = zi[g0:g0 + size], zt[g0:g0 + size]
    col_lse = np.full(size, -np.inf)
    row_lse = np.empty(size)
    for r in range(0, size, chunk):
      s = t * a[r:r + chunk] @ b.T
      m = s.max(1, keepdims=True)
      row_lse[r:r + chunk] = (m + np.log(np.exp(s - m).sum(1, keepdims=True)))[:, 0]
      m = s.max(0)
      col_lse = np.logaddexp(col_lse, m + np.log(np.exp(s - m).sum(0)))
    diag = t * np.sum(a * b, axis=1)
    loss += coef * np.sum(row_lse - diag + col_lse - diag)
    for r in range(0, size, chunk):
      s = t * a[r:r + chunk] @ b.T
      g = coef * (np.exp(s - row_lse[r:r + chunk, None]) + np.exp(s - col_lse[None, :]))
      dscale += np.sum(g * s)
      dzi[g0 + r:g0 + min(r + chunk, size)] = t * g @ b
      dzt[g0:g0 + size] += t * g.T @ a[r:r + chunk]
    dzi[g0:g0 + size] -= 2 * coef * t * b
    dzt[g0:g0 + size] -= 2 * coef * t * a
    dscale -= 2 * coef * np.sum(diag)
  return loss, dzi, dzt, dscale


def grad_error(got: Iterable[np.ndarray], want: Iterable[np.ndarray]) -> float:
  """Worst over the gradients of max |got − want| / max |want|."""
  errs = []
  for g, w in zip(got, want):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    errs.append(float(np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30)))
  return max(errs)


# ---------------------------------------------------------------------------- implementations
def make_impls(mesh, axis: str) -> dict[str, tuple[Callable, int]]:
  """name → (loss(zimg, ztxt, logit_scale) on global sharded arrays, number of groups)."""
  import jax
  import jax.numpy as jnp
  from jax import lax
  from jax.sharding import PartitionSpec as P
  from bigvl.losses import contrastive_loss, dense_contrastive_loss
  n = mesh.shape[axis]
  f32 = jnp.float32

  def naive_body(zi, zt, s):
    # An invariant all-gather transposes to a slice: no backward traffic, each device's rows get
    # their gradient from its own (identical) copy of the full loss.
    zi_all = lax.all_gather(zi, axis, tiled=True, to="invarying")
    zt_all = lax.all_gather(zt, axis, tiled=True, to="invarying")
    return dense_contrastive_loss(zi_all, zt_all, s)[0]

  def open_clip_body(zi, zt, s):
    b = zi.shape[0]
    zi_all = lax.all_gather(zi, axis, tiled=True).astype(f32)
    zt_all = lax.all_gather(zt, axis, tiled=True).astype(f32)
    t = jnp.exp(s.astype(f32))
    labels = lax.axis_index(axis) * b + jnp.arange(b)

    def ce(logits):
      pos = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
      return jnp.mean(jax.nn.logsumexp(logits, axis=1) - pos)

    loss = 0.5 * (ce(t * zi.astype(f32) @ zt_all.T) + ce(t * zt.astype(f32) @ zi_all.T))
    return lax.pmean(loss, axis)

  spec = (P(axis), P(axis), P())
  return {
      "naive": (jax.shard_map(naive_body, mesh=mesh, in_specs=spec, out_specs=P()), 1),
      "open_clip": (jax.shard_map(open_clip_body, mesh=mesh, in_specs=spec, out_specs=P()), 1),
      "ring": (lambda zi, zt, s: contrastive_loss(zi, zt, s, mesh, batch_axes=axis)[0], 1),
      "grouped": (lambda zi, zt, s: contrastive_loss(zi, zt, s, mesh, batch_axes=axis,
                                                     group_size=max(1, n // 2))[0],
                  n // max(1, n // 2)),
  }


def _available_bytes() -> int:
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return 1 << 62


def bench_one(name: str, fn: Callable, groups: int, mesh, axis: str, batch: int, dim: int,
              dtype: str, reps: int, execute: bool) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  n = mesh.shape[axis]
  rng = np.random.default_rng(batch)
  z = rng.standard_normal((2, batch, dim)).astype(np.float32)
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  z = z.astype(jnp.dtype(dtype))     # the oracle sees the exact (rounded) inputs
  scale = np.float32(math.log(1 / 0.07))
  rows = NamedSharding(mesh, P(axis))
  args = (jax.device_put(z[0], rows), jax.device_put(z[1], rows),
          jax.device_put(jnp.asarray(scale), NamedSharding(mesh, P())))
  step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))
  t0 = time.perf_counter()
  compiled = step.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  temp = int(compiled.memory_analysis().temp_size_in_bytes)
  coll = collectives(compiled.as_text(), n)
  rec: dict[str, Any] = {
      "impl": name, "devices": n, "batch": batch, "dim": dim, "dtype": dtype,
      "groups": groups, "temp_bytes": temp, "recv_bytes": coll["recv_bytes"],
      "collectives": coll["count"], "collectives_static": coll["static_count"],
      "collective_kinds": coll["by_kind"], "compile_s": round(compile_s, 3),
      "time_s": None, "grad_err": None, "loss_err": None,
  }
  # Fake CPU devices share the host's memory: skip running a program that would not fit.
  if not execute or (jax.devices()[0].platform == "cpu" and temp * n > 0.6 * _available_bytes()):
    rec["skipped"] = "not executed (--naive-max-batch or host memory)"
    return rec
  out = jax.block_until_ready(compiled(*args))   # warm-up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  rec["time_s"] = statistics.median(times)
  loss, (dzi, dzt, ds) = out
  want = oracle(np.asarray(z[0], np.float64), np.asarray(z[1], np.float64), float(scale), groups)
  rec["loss_err"] = abs(float(loss) - want[0]) / abs(want[0])
  rec["grad_err"] = grad_error((dzi, dzt, ds), want[1:])
  return rec


def table(records: list[dict[str, Any]]) -> str:
  mib = lambda x: f"{x / 2**20:9.2f}"
  lines = [f"{'impl':<10}{'N':>3}{'B':>7}{'d':>5}{'temp MiB':>10}{'×oc':>6}{'recv MiB':>10}"
           f"{'×oc':>6}{'colls':>7}{'time s':>9}{'×oc':>6}{'grad err':>10}"]
  base = {r["batch"]: r for r in records if r["impl"] == "open_clip"}
  for r in records:
    oc = base.get(r["batch"])
    ratio = lambda k: (f"{r[k] / oc[k]:6.2f}" if oc and r.get(k) is not None and oc.get(k)
                       else f"{'-':>6}")
    tm = f"{r['time_s']:9.3f}" if r["time_s"] is not None else f"{'-':>9}"
    ge = f"{r['grad_err']:10.1e}" if r["grad_err"] is not None else f"{'-':>10}"
    lines.append(f"{r['impl']:<10}{r['devices']:>3}{r['batch']:>7}{r['dim']:>5}"
                 f"{mib(r['temp_bytes']):>10}{ratio('temp_bytes')}{mib(r['recv_bytes']):>10}"
                 f"{ratio('recv_bytes')}{r['collectives']:>7}{tm}{ratio('time_s')}{ge}")
  return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--devices", type=int, default=None, help="N (default: 8 fake CPU devices, or "
                 "all accelerators when there are several)")
  p.add_argument("--dim", type=int, default=512)
  p.add_argument("--batch", default="4096,8192,16384", help="global batch sizes, comma-separated")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--impls", default=",".join(IMPLS))
  p.add_argument("--reps", type=int, default=3, help="timed runs per point (median reported)")
  p.add_argument("--naive-max-batch", type=int, default=4096,
                 help="larger batches compile naive (memory, traffic) but do not run its B² work")
  p.add_argument("--json", default=None, help="append one JSON line per implementation and batch")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  # Must precede the first use of jax's CPU backend; harmless where an accelerator is used.
  flag = f"--xla_force_host_platform_device_count={args.devices or 8}"
  os.environ["XLA_FLAGS"] = " ".join(
      f for f in os.environ.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count")) + " " + flag
  sys.path.insert(0, REPO)
  import jax
  from bigvl.parallel import mesh as mesh_lib

  devs = jax.devices()
  want = args.devices or (len(devs) if devs[0].platform != "cpu" and len(devs) >= 2 else 8)
  if devs[0].platform == "cpu" or len(devs) < want:
    devs = jax.devices("cpu")
  if len(devs) < want:
    raise SystemExit(f"--devices {want}: only {len(devs)} devices available")
  mesh = mesh_lib.make_mesh({"data": want}, devs[:want])
  impls = make_impls(mesh, "data")
  names = [s for s in args.impls.split(",") if s]
  unknown = set(names) - set(IMPLS)
  if unknown:
    raise SystemExit(f"--impls: unknown {sorted(unknown)}; choose from {IMPLS}")
  batches = [int(b) for b in str(args.batch).split(",") if b]
  if args.json:
    open(args.json, "w").close()
  print(f"devices: {want} × {devs[0].platform}, dim {args.dim}, {args.dtype}", flush=True)
  records = []
  for batch in batches:
    if batch % want:
      raise SystemExit(f"--batch {batch} is not divisible by {want} devices")
    for name in names:
      fn, groups = impls[name]
      rec = bench_one(name, fn, groups, mesh, "data", batch, args.dim, args.dtype, args.reps,
                      execute=name != "naive" or batch <= args.naive_max_batch)
      records.append(rec)
      print(f"  {name} B={batch}: temp {rec['temp_bytes'] / 2**20:.2f} MiB, recv "
            f"{rec['recv_bytes'] / 2**20:.2f} MiB, time {rec['time_s']}, grad_err "
            f"{rec['grad_err']}", flush=True)
      if args.json:
        with open(args.json, "a") as f:   # truncated at the start of the run
          f.write(json.dumps(rec) + "\n")
  print(table(records))
  return records


if __name__ == "__main__":
  main()
