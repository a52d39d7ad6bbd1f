"""TSGSV on the embedded stream world, on CPU: streaming temporal sentence grounding with a
compressed long memory and TwinNet (README, TSGSV).

  python launch/train.py --config=configs/tsgsv_tiny.py --workdir=workdirs/tsgsv_tiny
  ... --config.model.twin=False        (the main branch alone, the TwinNet ablation)
"""

from bigvl.systems.tsgsv import config as tsgsv_config
from bigvl.train import config_lib


def get_config():
  return config_lib.finalize(tsgsv_config.tiny_demo())
