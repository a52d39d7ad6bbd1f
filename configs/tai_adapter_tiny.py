"""Text-as-image adapter tiny: a multi-label classifier trained on sentences only, on the frozen
towers of configs/m2_tiny.py, and applied to pictures of the scene world.

  python launch/train.py --config=configs/tai_adapter_tiny.py --workdir=workdirs/tai_adapter_tiny

Without --config.init_from the m2_tiny backbone is trained first (once per machine, cached; about
nine minutes here). Sentences naming one to four of the world's 40 (colour, shape) labels are made
from templates in English and Chinese; the adapter is evaluated on 1,000 held-out scene pictures of
one to four objects: multilabel/map (with the adapter) against multilabel/zeroshot_map (the frozen
towers alone) and multilabel/chance_map.
"""

from bigvl.train import config_lib


def get_config():
  c = config_lib.full_config("tai_adapter")
  c.batch_size = 256
  c.total_steps = 300
  c.checkpoint_every = 300
  c.log_every = 25
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 30
  c.optim.weight_decay = 0.0
  return config_lib.finalize(c)
