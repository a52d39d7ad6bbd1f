"""M²-Encoder tiny: the embedded default, trained on CPU in minutes on the synthetic bilingual world.

  python launch/train.py --config=configs/m2_tiny.py --workdir=workdirs/m2_tiny

Zero-shot accuracy is measured on colour×shape combinations that never occur in training. The sizes
and schedule (and why they are what they are): `bigvl.systems.m2_encoder.config.tiny_demo`.
"""

from bigvl.systems.m2_encoder import config as m2_config
from bigvl.train import config_lib


def get_config():
  return config_lib.finalize(m2_config.tiny_demo())
