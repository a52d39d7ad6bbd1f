"""SNP-S3 pretraining on the embedded video world, on CPU: one shared BERT, MSSM + LVWM + MoCo
contrast + ITM (README, SNP-S3).

  python launch/train.py --config=configs/snp_s3_tiny.py --workdir=workdirs/snp_s3_tiny
"""

from bigvl.systems.snp_s3 import config as snp_config
from bigvl.train import config_lib


def get_config():
  return config_lib.finalize(snp_config.tiny_demo())
