r"""M²-Encoder-10B (≈10.2 B parameters in the released checkpoint), contrastive pretraining on your shards.

Sized for a v5p-256 slice (128 chips, 32 hosts): global batch 32,768 (256 per chip), parameters and
optimizer state sharded over every chip (fsdp), each stack one scanned, rematerialised layer,
bfloat16 compute with float32 parameters. Check the fit without a TPU (README, "Pods"):

  python launch/plan.py --config=configs/m2_10b.py --topology=v5p-256

On the TPU VM slice, from your workstation (every worker runs the same command: the shards and the
workdir on a bucket all workers read, the tokenizer at the same path on every worker):

  launch/tpu_vm.sh --tpu=my-v5p-256 --zone=us-east5-a setup
  launch/tpu_vm.sh --tpu=my-v5p-256 --zone=us-east5-a run -- \
      python launch/train.py --config=configs/m2_10b.py --workdir=gs://BUCKET/m2_10b \
      --config.data.train_files='gs://BUCKET/shards/train-*.array_record' \
      --config.tokenizer.path=/path/to/glm_chinese_sp.model

Needs shards made by launch/build_shards.py and the GLM SentencePiece model released with the weights.
"""

from bigvl.systems.m2_encoder import config as m2_config
from bigvl.train import config_lib


def get_config():
  return config_lib.finalize(m2_config.pretrain_on_shards("10B", batch_size=32768))
