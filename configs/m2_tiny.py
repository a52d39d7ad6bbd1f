"""M²-Encoder tiny: the embedded default, trained on CPU in minutes on the synthetic bilingual world.

  python launch/train.py --config=configs/m2_tiny.py --workdir=/tmp/bigvl_tiny
"""

from bigvl.train import config_lib


def get_config():
  c = config_lib.base_config()
  c.model.variant = "tiny"
  c.batch_size = 128
  c.total_steps = 600
  c.checkpoint_every = 200
  c.log_every = 25
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  return config_lib.finalize(c)
