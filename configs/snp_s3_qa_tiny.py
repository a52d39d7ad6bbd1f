"""SNP-S3 video QA fine-tuning (multiple choice and open) from the pretraining demo
(configs/snp_s3_tiny.py, trained first and cached when init_from is empty), on CPU.

  python launch/train.py --config=configs/snp_s3_qa_tiny.py --workdir=workdirs/snp_s3_qa_tiny
  ... --config.init_from=workdirs/snp_s3_tiny     (a pretraining run of your own)
  ... --config.backbone.config=                   (from nothing: the random-init baseline)
"""

from bigvl.systems.snp_s3 import config as snp_config
from bigvl.train import config_lib


def get_config():
  return config_lib.finalize(snp_config.qa_demo())
