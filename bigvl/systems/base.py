"""The system protocol: everything the one training loop knows about a system.

A system (one paper's model, losses, data and evaluations) subclasses `System` and fills in what its
training needs; the loop (`bigvl.train.loop`), `launch/eval.py`, `launch/plan.py` and
`launch/bench_train.py` talk to it only through these members. The defaults are what most systems
want: every `nnx.Param` trained with AdamW, a plain (or micro-batched) `value_and_grad`, no state
beside the parameters, no evaluations.

Members beyond shared/docs/architecture.md §1, and why:
  accum_steps            the loop checks that the global batch splits into this many micro-batches
                         per data-parallel shard before anything compiles.
  param_groups()         (path regex, lr multiplier) pairs: what `optimizer` scales; a system lists
                         its groups here instead of rewriting the optimizer.
  scheduled(step)        scalars that follow the number of updates done (an annealed temperature,
                         a ramped loss weight), computed inside the jitted step and handed to
                         `value_and_grad` / `loss` in the batch, so a resumed run gets the same.
  fake_batch(...)        a batch of `batch_spec`'s shapes with plausible values, for benchmarks and
                         ahead-of-time plans that have no data.
  describe()             a few JSON-able facts of the model for plan and benchmark reports.
  prepare_for_checkpoint(source)  `prepare` for evaluating a checkpoint: its pinned tokenizer.
  forward_flops_by_part  the analytic forward FLOPs per example, by part (benchmark reports).
  value_and_grad_with_extra(...)  the step's gradient for a loss that reads the `extra` state and
                         writes it (a MoCo queue the loss reads and this step's keys fill); the
                         loop calls it, and by default it is `value_and_grad` with `extra` as it
                         was. `post_update` then sees the extra it returns.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from bigvl.losses import accumulate
from bigvl.parallel import mesh as mesh_lib
from bigvl.train import optim

PyTree = Any


class System:
  """Base class with the protocol's defaults. Subclasses set `name` and override what they need."""

  name: str = ""
  # Which parameters are trained (an nnx filter). The others are frozen: no optimizer state, no
  # update, saved once per run (not in every checkpoint), and handed to `loss` unchanged.
  trainable: Any = nnx.Param
  # The top-level parameter key under which the system keeps a model that launch/export_torch.py
  # writes ("": the whole model is one; SyCoCa: "towers", its M²-Encoder).
  export_subtree: str = ""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, rules: Sequence[tuple]):
    self.config, self.mesh, self.rules = config, mesh, tuple(rules)

  # ------------------------------------------------------------------ config
  @staticmethod
  def default_config() -> ml_collections.ConfigDict:
    """This system's own keys (model, loss, data, tokenizer, evals), merged under the loop's."""
    return ml_collections.ConfigDict()

  @classmethod
  def validate(cls, config: ml_collections.ConfigDict, *, check_paths: bool = True,
               training: bool = True) -> None:
    """Raises `config_lib.ConfigError` (one line) for a config that cannot run; `check_paths=False`
    when planning on a machine that does not hold the data (launch/plan.py); `training=False`
    when a checkpoint is only evaluated (no training data needed)."""

  # ------------------------------------------------------------------ data
  def prepare(self, workdir: str | None) -> None:
    """Data and tokenizer present (an embedded world built once); tokenizer pinned in `workdir`."""

  def prepare_for_checkpoint(self, source: str) -> None:
    """What evaluating the checkpoint at `source` (a workdir or a parameter directory) needs: by
    default `prepare(None)`; a system whose checkpoints carry their tokenizer reads it there."""
    self.prepare(None)

  def train_data(self, local_batch: int, block: int, blocks: int) -> Iterator[dict[str, np.ndarray]]:
    """A checkpointable (grain) iterator of the rows [block*local_batch, (block+1)*local_batch) of
    every global batch of `blocks * local_batch` rows."""
    raise NotImplementedError(f"{type(self).__name__}.train_data")

  def batch_spec(self, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch as shapes; the loop keeps only these keys of what `train_data` yields."""
    raise NotImplementedError(f"{type(self).__name__}.batch_spec")

  def fake_batch(self, global_batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch of `batch_spec`'s shapes without data: floats N(0, 1), integers 0."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, s in self.batch_spec(global_batch).items():
      if jnp.issubdtype(s.dtype, jnp.floating):
        out[k] = rng.standard_normal(s.shape).astype(s.dtype)
      else:
        out[k] = np.zeros(s.shape, s.dtype)
    return out

  # ------------------------------------------------------------------ model and optimizer
  def make_model(self, rngs: nnx.Rngs) -> nnx.Module:
    raise NotImplementedError(f"{type(self).__name__}.make_model")

  def make_eval_model(self, rngs: nnx.Rngs) -> nnx.Module:
    """The model the predictors run: the same parameters, possibly another compute precision
    (evaluation in float32 where training computes in bfloat16). Default: `make_model`."""
    return self.make_model(rngs)

  def param_groups(self) -> Sequence[tuple[str, float]]:
    """(regex on the parameter path "a/b/kernel", lr multiplier); the first match wins."""
    return ()

  def optimizer(self, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW from `config.optim` (bigvl.train.optim), its updates scaled per `param_groups`."""
    tx = optim.adamw(self.config.optim, schedule)
    groups = [(re.compile(p), float(m)) for p, m in self.param_groups()]
    if not groups:
      return tx
    return optax.chain(tx, optim.scale_by_group(lambda path: next(
        (m for p, m in groups if p.search(path)), 1.0)))

  # ------------------------------------------------------------------ loss and gradients
  def scheduled(self, step: jax.Array) -> dict[str, jax.Array]:
    """{name: scalar} from the number of updates done, added to each step's batch (and logged as
    train/<name>); none by default."""
    return {}

  def loss(self, model: nnx.Module, batch: dict[str, jax.Array], rng: jax.Array
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(scalar loss, aux metrics) of one batch; `rng` is this step's key (dropout, masking)."""
    raise NotImplementedError(f"{type(self).__name__}.loss")

  @property
  def accum_steps(self) -> int:
    """Micro-batches per step (`config.loss.accum_steps` when the system has that key)."""
    loss = self.config.get("loss")
    return int(loss.get("accum_steps", 1)) if loss is not None else 1

  def value_and_grad(self, graphdef: nnx.GraphDef, params: PyTree, frozen: PyTree,
                     batch: dict[str, jax.Array], rng: jax.Array
                     ) -> tuple[tuple[jax.Array, dict[str, jax.Array]], PyTree]:
    """((loss, aux), gradient w.r.t. `params`), frozen weights held fixed.

    With `accum_steps` K > 1 the batch is split into K micro-batches (each shard's rows split
    locally, so no row changes device); loss, aux and gradient are their means, and micro-batch k
    draws from `fold_in(rng, k)`. Right for losses that are means over independent examples;
    losses that couple the batch (contrastive) override this (GradCache).
    """
    def loss_fn(p, b, key):
      return self.loss(nnx.merge(graphdef, p, frozen), b, key)

    k = self.accum_steps
    if k == 1:
      return jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
    dp = mesh_lib.data_parallel_size(self.mesh, self.rules)
    scalars = {name: v for name, v in batch.items() if jnp.ndim(v) == 0}   # `scheduled` ones
    micro = accumulate.split_micro_batches(
        {name: v for name, v in batch.items() if name not in scalars}, k, dp)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def one(acc, xs):
      i, mb = xs
      return jax.tree.map(jnp.add, acc, grad_fn(params, {**mb, **scalars},
                                                jax.random.fold_in(rng, i))), None

    first = {**jax.tree.map(lambda x: x[0], micro), **scalars}
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, first, rng))
    total, _ = jax.lax.scan(one, zeros, (jnp.arange(k), micro))
    return jax.tree.map(lambda x: x / k, total)

  def value_and_grad_with_extra(self, graphdef: nnx.GraphDef, params: PyTree, frozen: PyTree,
                                extra: PyTree, batch: dict[str, jax.Array], rng: jax.Array
                                ) -> tuple[tuple[jax.Array, dict[str, jax.Array]], PyTree, PyTree]:
    """((loss, aux), gradient, extra after this step's writes): what the loop calls each step.
    The default: `value_and_grad`, `extra` unchanged."""
    loss_aux, grads = self.value_and_grad(graphdef, params, frozen, batch, rng)
    return loss_aux, grads, extra

  # ------------------------------------------------------------------ state beside the parameters
  def init_extra(self, params: PyTree) -> PyTree:
    """State kept beside the trained parameters (EMA weights, a queue), checkpointed with them."""
    return {}

  def post_update(self, params: PyTree, extra: PyTree, step: jax.Array) -> tuple[PyTree, PyTree]:
    """Rules after each optimizer update (a clamp, an EMA); `step` counts the updates done."""
    return params, extra

  # ------------------------------------------------------------------ evaluation and reports
  def predictors(self, graphdef: nnx.GraphDef) -> dict[str, Callable[[PyTree, dict], dict]]:
    """Named jittable functions `(all parameters, batch) → dict of arrays` for evaluators."""
    return {}

  def evaluators(self, only: Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluator objects (`run(predictor) → metrics`) built from `config.evals`, by name."""
    return {}

  def flops_per_example(self) -> float | None:
    """Model FLOPs of one training example (3 × forward matmuls), or None when unknown."""
    return None

  def forward_flops_by_part(self) -> Mapping[str, float]:
    return {}

  def describe(self) -> dict[str, Any]:
    return {}
