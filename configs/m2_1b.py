"""M²-Encoder-1B (≈0.73 B parameters in the released checkpoint), contrastive pretraining on your shards.

Needs shards made by launch/build_shards.py and the GLM SentencePiece model released with the weights:

  python launch/train.py --config=configs/m2_1b.py --workdir=gs://BUCKET/m2_1b \
      --config.data.train_files='gs://BUCKET/shards/train-*.array_record' \
      --config.tokenizer.path=/path/to/glm_chinese_sp.model

Sized for a v5p-128 slice; the pod launch scripts come with the sharding issue.
"""

from bigvl.train import config_lib


def get_config():
  return config_lib.finalize(config_lib.pretrain_on_shards("1B", batch_size=16384))
