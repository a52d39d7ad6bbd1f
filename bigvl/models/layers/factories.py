"""The plain sub-module factories that shared layers take as `linear=` and `norm=`.

A model fixes dtypes, initialisation and its `nnx.Rngs` once; every layer then draws its projections
and norms from the same place, in construction order (which fixes the random initial values).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp
from flax import nnx

from bigvl.models.layers.init import Initializer, linear, trunc_normal
from bigvl.models.layers.norms import LayerNorm, RMSNorm

NORMS = {"layer": LayerNorm, "rms": RMSNorm}


def _beit_init(gain: float) -> Initializer:
  return trunc_normal(0.02, gain)


@dataclasses.dataclass(frozen=True)
class Linears:
  """`Linears(rngs).linear` and `.norm`: plain `nnx.Linear` and LayerNorm/RMSNorm factories.

  `kernel_init(gain)` gives the kernel initializer (default: BEiT's truncated normal, std 0.02);
  `norm_kind` is a key of `NORMS`.
  """
  rngs: nnx.Rngs
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable[[float], Initializer] = _beit_init
  norm_kind: str = "layer"
  norm_eps: float = 1e-5

  def __post_init__(self):
    if self.norm_kind not in NORMS:
      raise ValueError(f"norm_kind={self.norm_kind!r}: use one of {sorted(NORMS)}")

  def linear(self, d_in: int, d_out: int, names: tuple[str | None, str | None], *,
             gain: float = 1.0, use_bias: bool = True) -> nnx.Linear:
    return linear(d_in, d_out, names, kernel_init=self.kernel_init(gain), rngs=self.rngs,
                  dtype=self.dtype, param_dtype=self.param_dtype, use_bias=use_bias)

  def norm(self, dim: int) -> LayerNorm | RMSNorm:
    return NORMS[self.norm_kind](dim, eps=self.norm_eps, dtype=self.dtype,
                                 param_dtype=self.param_dtype)
