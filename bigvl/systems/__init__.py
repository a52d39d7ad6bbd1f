"""Systems: what a paper brings to the shared training loop (model, losses, data, evals).

A small typed table, not a registry filled by import side effects: an unknown `config.system` fails
when the config is loaded.
"""

from __future__ import annotations

from typing import Sequence

import ml_collections
from jax.sharding import Mesh

from bigvl.systems import base
from bigvl.systems.m2_encoder import system as m2_encoder

SYSTEMS: dict[str, type[base.System]] = {
    "m2_encoder": m2_encoder.M2EncoderSystem,
}


def get(name: str) -> type[base.System]:
  if name not in SYSTEMS:
    raise ValueError(f"config.system={name!r} is not one of {sorted(SYSTEMS)}")
  return SYSTEMS[name]


def build(config: ml_collections.ConfigDict, mesh: Mesh, rules: Sequence[tuple]) -> base.System:
  return get(config.system)(config, mesh, rules)
