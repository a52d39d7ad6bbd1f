"""Fingerprints that let a checkpoint be trusted: one checksum per array, and finiteness, computed
where the arrays live.

A checkpoint's compressed chunks can decode after bytes in them were overwritten or flipped, so a
restore that succeeds proves nothing. Each save records, per array, a 64-bit checksum of its bits
(two 32-bit position-weighted sums with different mixing constants, wrapping) and whether every value
is finite; a restore recomputes them on the restored arrays and compares. The sums are one fused
reduction per array on the devices that hold it (sharded arrays reduce across devices); only two
scalars per array travel to the host, so the cost is one read of the state, far below writing it.
The data iterator's state is covered by a SHA-256 of its canonical JSON.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

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
