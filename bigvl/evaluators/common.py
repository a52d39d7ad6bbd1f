"""What an evaluator is given: a system's predictors, run with the current parameters on every
device of every process, and the rows themselves, read lazily.

A predictor is a named jittable function `params, batch → dict of arrays`, one row of every output
per row of the batch ("embed_image": {"image"} → {"embedding": (B, d)}; "embed_text": {"text",
"text_mask"} → {"embedding"}); `sharded_predictor` jits a system's predictors once.

Many hosts: process p reads and runs only its own contiguous block of rows; every batch is padded
to one fixed shape (so all processes run the same programs the same number of times) and carries
each row's index, -1 on padding. The outputs are gathered to every process and put back in row order
by that index, so a padded row is never counted and no row is counted twice, whatever the number of
processes or devices.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from bigvl.data.prompts import format_prompt

# Integer columns of the rows a predictor hands back with its outputs (gathered the same way), so a
# process never needs the labels of rows it did not read.
PASSTHROUGH = ("label",)


@dataclasses.dataclass(frozen=True)
class Rows:
  """`n` rows; `load(indices)` returns a dict of arrays with one row per index (in that order)."""
  n: int
  load: Callable[[np.ndarray], dict[str, np.ndarray]]

  def __len__(self) -> int:
    return self.n

  @staticmethod
  def of(**arrays: np.ndarray) -> "Rows":
    """Rows held in memory (every process holds all of them and reads its own block)."""
    n = len(next(iter(arrays.values())))
    return Rows(n, lambda idx: {k: np.asarray(v)[idx] for k, v in arrays.items()})


class Evaluator(Protocol):
  every: int

  def run(self, predictor: "Predictor") -> Mapping[str, float]: ...


def process_block(n: int, process_index: int, process_count: int) -> tuple[int, int]:
  """The rows [lo, hi) process `process_index` reads: contiguous blocks of ceil(n / P) rows (the
  last blocks may be shorter or empty)."""
  per = math.ceil(n / process_count)
  lo = min(n, process_index * per)
  return lo, min(n, lo + per)


def padded_batches(n: int, local_batch: int, process_index: int, process_count: int
                   ) -> list[np.ndarray]:
  """This process's row indices, batch by batch, each padded with -1 to `local_batch`. Every process
  gets the same number of batches (at least one)."""
  lo, hi = process_block(n, process_index, process_count)
  steps = max(1, math.ceil(math.ceil(n / process_count) / local_batch))
  out = []
  for s in range(steps):
    idx = np.arange(lo + s * local_batch, min(hi, lo + (s + 1) * local_batch))
    out.append(np.concatenate([idx, np.full(local_batch - len(idx), -1)]).astype(np.int32))
  return out


class Predictor:
  """A system's predictors with `params`, each batch split over every device of `mesh`."""

  def __init__(self, jitted: Mapping[str, Callable], params: Any, mesh, batch_size: int):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    self._jitted, self.params, self.mesh = jitted, params, mesh
    # The batch over all mesh axes: each device a distinct slice, each process a distinct block.
    self._sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    self._unit = math.lcm(mesh.size, jax.process_count())
    self.batch_size = batch_size

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(self._jitted)

  def _global_batch(self, batch_size: int | None) -> int:
    bs = batch_size or self.batch_size
    return math.ceil(bs / self._unit) * self._unit

  def run(self, name: str, rows: Rows, batch_size: int | None = None) -> dict[str, np.ndarray]:
    """Every output of predictor `name` over `rows`, and any PASSTHROUGH column of the rows, in row
    order, on every process."""
    import jax
    if name not in self._jitted:
      raise KeyError(f"no predictor {name!r}; this system gives {sorted(self._jitted)}")
    pc, pi = jax.process_count(), jax.process_index()
    local_bs = self._global_batch(batch_size) // pc
    template = None
    pieces: list[dict[str, np.ndarray]] = []
    for idx in padded_batches(rows.n, local_bs, pi, pc):
      valid = idx >= 0
      if valid.any():
        batch = rows.load(idx[valid])
        template = template or {k: v[:1] for k, v in batch.items()}
      else:  # this process has run out of rows: it still takes part, with padding only
        template = template or {k: v[:1] for k, v in rows.load(np.array([0])).items()}
        batch = {k: v[:0] for k, v in template.items()}
      pad = local_bs - len(batch[next(iter(batch))])
      fill = batch if valid.any() else template
      batch = {k: np.concatenate([v, np.repeat(np.asarray(fill[k])[:1], pad, axis=0)])
               for k, v in batch.items()}
      batch["index"] = idx
      global_batch = {k: jax.make_array_from_process_local_data(self._sharding, np.asarray(v))
                      for k, v in batch.items()}
      out = self._jitted[name](self.params, global_batch)
      pieces.append({k: _local_copy(v) for k, v in out.items()})
    got = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
    index = got.pop("index")
    keep = index >= 0
    counts = np.bincount(index[keep], minlength=rows.n)
    if len(counts) != rows.n or not (counts == 1).all():
      raise AssertionError(f"gathered rows are not each row once (n={rows.n}, counts "
                           f"{np.unique(counts)})")
    order = np.argsort(index[keep], kind="stable")
    return {k: v[keep][order] for k, v in got.items()}


def _local_copy(x) -> np.ndarray:
  # A replicated output: every process holds all of it; read this process's first copy.
  return np.asarray(x.addressable_data(0))


class _Predictors:
  """params → Predictor, over programs jitted once (see sharded_predictor)."""

  def __init__(self, jitted: Mapping[str, Callable], mesh, batch_size: int):
    self._jitted, self._mesh, self._batch_size = dict(jitted), mesh, batch_size

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(self._jitted)

  def __call__(self, params: Any) -> Predictor:
    return Predictor(self._jitted, params, self._mesh, self._batch_size)


def sharded_predictor(fns: Mapping[str, Callable], mesh, batch_size: int
                      ) -> Callable[[Any], Predictor]:
  """params → Predictor (with `.names`, the predictors' names); the functions are jitted once here,
  so every evaluation (and every set of parameters of the same shapes) reuses the compiled
  programs. `batch_size` is the default global batch of `Predictor.run`."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  repl = NamedSharding(mesh, P())

  def wrap(name, fn):
    def run(params, batch):
      out = dict(fn(params, batch))
      clash = sorted({"index", *PASSTHROUGH} & set(out))
      if clash:
        raise ValueError(f"predictor {name!r} returns {clash}: names the runner keeps for the rows")
      out["index"] = batch["index"]
      out.update({k: batch[k] for k in PASSTHROUGH if k in batch})
      return out
    return jax.jit(run, out_shardings=repl)

  return _Predictors({name: wrap(name, fn) for name, fn in fns.items()}, mesh, batch_size)


def class_embeddings(predictor: Predictor, tokenizer,
                     classnames: Sequence[str | Mapping[str, str]], templates: Sequence[str],
                     batch_size: int | None = None) -> np.ndarray:
  """Per class: mean of the L2-normalised "embed_text" embeddings of every prompt, renormalised.
  (C, d). A class name may be a string or a mapping of forms (see `prompts.format_prompt`).
  """
  texts = [format_prompt(t, c) for c in classnames for t in templates]
  ids, mask = tokenizer.encode_batch(texts)
  z = predictor.run("embed_text", Rows.of(text=ids, text_mask=mask), batch_size)["embedding"]
  z = z.reshape(len(classnames), len(templates), -1)
  z = z / np.linalg.norm(z, axis=-1, keepdims=True)
  z = z.mean(axis=1)
  return z / np.linalg.norm(z, axis=-1, keepdims=True)


def as_written(tokenizer):
  """The tokenizer without its own text normalisation (`GLMTokenizer.as_written`), where it has
  one: evaluators prepare their texts per task."""
  f = getattr(tokenizer, "as_written", None)
  return f() if f is not None else tokenizer
