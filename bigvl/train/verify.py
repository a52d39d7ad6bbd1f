"""What lets a checkpoint be trusted: digests of the files a save wrote, and finiteness.

A checkpoint's compressed chunks can decode after bytes in them were overwritten or flipped, so a
restore that succeeds proves nothing. Each process digests the files it wrote, right after the save
(XXH3-128 over a memory map of each file, still in the page cache: about 10 GB/s per core, a few
percent of the time the save took to write them), and a restore checks them before it reads a byte.
A train state is finite by construction (the step never applies a non-finite update, and a restore
checks every float array), so a save needs no pass over the arrays.

`fingerprints` (one position-weighted checksum per array, computed on the devices) is what bigvl
wrote before file digests (format 1); it still verifies those checkpoints and the frozen weights,
which are saved once per run. On the CPU its integer reductions run at under 1 GB/s, too slow to be
paid at every save. The data iterator's state is also covered by a SHA-256 of its canonical JSON.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import mmap
import os
import re
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
import xxhash

_C1, _C2 = np.uint32(0x9E3779B1), np.uint32(0x85EBCA77)


def _bits(x: jax.Array) -> jax.Array:
  """The array's bits as a flat uint32 vector (narrower types widened, wider ones split)."""
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
  if size == 8:   # (n,) 64-bit → (n, 2) 32-bit
    return lax.bitcast_convert_type(x, unsigned).reshape(-1)
  return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _mix(h: jax.Array) -> jax.Array:
  # A multiply-xorshift avalanche: one changed bit changes about half of the result's bits.
  h = h ^ (h >> 16)
  h = h * np.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * np.uint32(0x846CA68B)
  return h ^ (h >> 16)


def _fingerprint(x: jax.Array) -> jax.Array:
  """uint32 [sum1, sum2, all finite] of one array."""
  bits = _bits(x)
  if bits.size == 0:
    return jnp.zeros((3,), jnp.uint32).at[2].set(1)
  idx = lax.iota(jnp.uint32, bits.size)
  s1 = jnp.sum(_mix(bits ^ (idx * _C1)), dtype=jnp.uint32)
  s2 = jnp.sum(_mix(bits + idx * _C2 + np.uint32(1)) * (idx | np.uint32(1)), dtype=jnp.uint32)
  finite = (jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
            else jnp.array(True))
  return jnp.stack([s1, s2, finite.astype(jnp.uint32)])


@jax.jit
def _fingerprints(tree: Any) -> Any:
  return jax.tree.map(_fingerprint, tree)


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def fingerprints(tree: Any) -> dict[str, dict[str, Any]]:
  """{path: {"sum": "hex16", "finite": bool}} of every array of `tree` (on its devices)."""
  got = jax.device_get(_fingerprints(tree))
  out = {}
  for path, fp in jax.tree_util.tree_leaves_with_path(got):
    fp = np.asarray(fp, np.uint32)
    out[path_str(path)] = {"sum": f"{int(fp[0]):08x}{int(fp[1]):08x}", "finite": bool(fp[2])}
  return out


def nonfinite(prints: dict[str, dict[str, Any]]) -> list[str]:
  """The paths whose arrays hold a NaN or an infinity."""
  return sorted(k for k, v in prints.items() if not v["finite"])


def compare(saved: dict[str, dict[str, Any]], got: dict[str, dict[str, Any]]) -> list[str]:
  """What differs between the fingerprints a save recorded and those of what was restored."""
  out = [f"{k}: missing" for k in sorted(set(saved) - set(got))]
  out += [f"{k}: not recorded" for k in sorted(set(got) - set(saved))]
  out += [f"{k}: checksum {got[k]['sum']} != saved {saved[k]['sum']}"
          for k in sorted(set(saved) & set(got)) if saved[k]["sum"] != got[k]["sum"]]
  return out


def json_digest(state: Any) -> str:
  """SHA-256 of a JSON-able value in canonical form (sorted keys, no spaces)."""
  return hashlib.sha256(json.dumps(state, sort_keys=True, separators=(",", ":"))
                        .encode()).hexdigest()


# ---- file digests --------------------------------------------------------------------------------

_PROCESS = re.compile(r"process_(\d+)")


def file_owner(relpath: str) -> int:
  """The process that writes `relpath` of a checkpoint: the one a `process_<i>` path component
  names (orbax's `ocdbt.process_<i>/`, `array_metadatas/process_<i>`, grain's
  `process_<i>-of-<n>.json`), else process 0 (the metadata, manifests and markers it writes)."""
  for part in relpath.split("/"):
    m = _PROCESS.search(part)
    if m:
      return int(m.group(1))
  return 0


def file_digest(path: str) -> str:
  """XXH3-128 of a file's bytes, hex."""
  with open(path, "rb") as f:
    size = os.fstat(f.fileno()).st_size
    if size == 0:
      return xxhash.xxh3_128(b"").hexdigest()
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
      return xxhash.xxh3_128(m).hexdigest()


def list_files(root: str, *, owner: int | None = None, skip: Iterable[str] = ()) -> list[str]:
  """Relative paths of the files under `root` (those `owner` writes, when given), sorted."""
  skip = tuple(skip)
  out = []
  for d, _, files in os.walk(root):
    for f in files:
      rel = os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
      if rel.startswith(skip) or (owner is not None and file_owner(rel) != owner):
        continue
      out.append(rel)
  return sorted(out)


def digest_files(root: str, files: list[str], threads: int = 2) -> dict[str, dict[str, Any]]:
  """{relpath: {"bytes": n, "xxh3": hex}} of `files` under `root`, hashed in `threads` threads."""
  def one(rel):
    path = os.path.join(root, rel)
    return rel, {"bytes": os.path.getsize(path), "xxh3": file_digest(path)}
  if threads <= 1 or len(files) <= 1:
    return dict(map(one, files))
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    return dict(pool.map(one, files))


def check_files(root: str, saved: dict[str, dict[str, Any]], threads: int = 2) -> list[str]:
  """What differs between the files under `root` and the digests a save recorded (cheap checks
  first: a missing file or another size is reported without reading it)."""
  problems, to_hash = [], []
  for rel, want in sorted(saved.items()):
    path = os.path.join(root, rel)
    try:
      size = os.path.getsize(path)
    except OSError:
      problems.append(f"{rel}: missing")
      continue
    if size != want["bytes"]:
      problems.append(f"{rel}: {size} bytes, {want['bytes']} were written")
    else:
      to_hash.append(rel)
  for rel, got in digest_files(root, to_hash, threads).items():
    if got["xxh3"] != saved[rel]["xxh3"]:
      problems.append(f"{rel}: its bytes changed since the save (digest {got['xxh3'][:12]}…, "
                      f"{saved[rel]['xxh3'][:12]}… was written)")
  return problems


@jax.jit
def _finite_flags(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
                      else jnp.array(True), tree)


def nonfinite_arrays(tree: Any) -> list[str]:
  """The paths of `tree`'s float arrays that hold a NaN or an infinity (one fused pass)."""
  got = jax.device_get(_finite_flags(tree))
  return sorted(path_str(p) for p, ok in jax.tree_util.tree_leaves_with_path(got) if not ok)
