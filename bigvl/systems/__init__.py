"""Systems: what a paper brings to the shared training loop (model, loss, data, evals).

A small typed table, not a registry filled by import side effects: an unknown `config.system` fails
when the config is loaded.
"""

from __future__ import annotations

import ml_collections

from bigvl.systems import contrastive

SYSTEMS = {
    "m2_encoder": contrastive.ContrastiveSystem,
}


def build(config: ml_collections.ConfigDict):
  if config.system not in SYSTEMS:
    raise ValueError(f"config.system={config.system!r} is not one of {sorted(SYSTEMS)}")
  return SYSTEMS[config.system](config)
