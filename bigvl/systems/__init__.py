"""Systems: what a paper brings to the shared training loop (model, losses, data, evals).

A small table, not a registry filled by import side effects: `config.system` names a class by its
module and name, imported when asked for (so a system's modules, which import `bigvl.systems.base`,
never import this package's table back: no import circle), and an unknown name fails when the
config is loaded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Sequence

import ml_collections
from jax.sharding import Mesh

if TYPE_CHECKING:
  from bigvl.systems.base import System

# name → "module:Class", or a class (tests add their own toy systems this way).
SYSTEMS: dict[str, str | type[System]] = {
    "m2_encoder": "bigvl.systems.m2_encoder.system:M2EncoderSystem",
    "sycoca": "bigvl.systems.sycoca.system:SyCoCaSystem",
    "tai_adapter": "bigvl.systems.tai_adapter.system:TaIAdapterSystem",
    "switch_bert": "bigvl.systems.switch_bert.system:SwitchBertSystem",
    "dmae": "bigvl.systems.dmae.system:DMAESystem",
    "snp_s3": "bigvl.systems.snp_s3.system:SNPS3System",
    "tsgsv": "bigvl.systems.tsgsv.system:TSGSVSystem",
}


def get(name: str) -> type[System]:
  if name not in SYSTEMS:
    raise ValueError(f"config.system={name!r} is not one of {sorted(SYSTEMS)}")
  entry = SYSTEMS[name]
  if isinstance(entry, str):
    module, _, cls = entry.partition(":")
    entry = getattr(importlib.import_module(module), cls)
  return entry


def build(config: ml_collections.ConfigDict, mesh: Mesh, rules: Sequence[tuple]) -> System:
  return get(config.system)(config, mesh, rules)
