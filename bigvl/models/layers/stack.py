"""Running a stack of layers: a Python loop or one `lax.scan`, each layer optionally rematerialised.

Both change how the step is compiled, never what it computes or how parameters are laid out: the
parameters stay one module per layer (the checkpoint and PyTorch layout) either way.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# `model.remat_policy`: what a rematerialised layer keeps from its forward pass for the backward
# pass (everything else is recomputed). "full" keeps only the layer's input: the least memory.
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# call(layer, x, *args) -> x: how one layer runs. Static choices (a Multiway branch, a flag) are
# closed over; `args` are the arrays every layer reads (a padding mask, a context) or None.
LayerCall = Callable[..., jax.Array]


def check_remat_policy(name: str) -> None:
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat_policy={name!r}: use one of {sorted(REMAT_POLICIES)}")


def run_layers(layers: Sequence[nnx.Module], x: jax.Array, call: LayerCall, *args: Any,
               remat: bool = False, remat_policy: str = "full", scan: bool = False) -> jax.Array:
  """x through every layer in order: `x = call(layer, x, *args)`.

  scan: the layers as one `lax.scan` (needs layers of one structure); XLA compiles one layer
  instead of len(layers) copies. remat: each layer's activations are recomputed in the backward
  pass, keeping what `REMAT_POLICIES[remat_policy]` names.
  """
  policy = REMAT_POLICIES[remat_policy]
  if scan and len(layers) > 1:
    return _scan(layers, x, call, args, remat, policy)
  if remat:
    call = nnx.remat(call, policy=policy)
  for layer in layers:
    x = call(layer, x, *args)
  return x


def _scan(layers, x, call, args, remat, policy) -> jax.Array:
  """The parameters are stacked here, inside the step, along a new leading axis. The stack costs
  one extra copy of the stack's (sharded) parameters while the step runs; its gradient is the
  per-layer gradients."""
  parts = [nnx.split(layer) for layer in layers]
  graphdef = parts[0][0]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[state for _, state in parts])

  def body(x, state):
    return call(nnx.merge(graphdef, state), x, *args), None

  if remat:
    # prevent_cse is not needed inside scan and costs fusions.
    body = jax.checkpoint(body, policy=policy, prevent_cse=False)
  x, _ = jax.lax.scan(body, x, stacked)
  return x
