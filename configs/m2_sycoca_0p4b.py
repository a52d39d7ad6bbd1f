r"""M²-Encoder-0.4B pretrained with SyCoCa's heads (the M²-Encoder authors' recipe): ITC + 2·IC +
TG-MIM with attentive masking, on your shards. The towers keep the released layout
(`launch/export_torch.py` writes them as an M²-Encoder checkpoint).

Sized for a v5p-64 slice (32 chips), like configs/m2_0p4b.py. Check the fit without a TPU:

  python launch/plan.py --config=configs/m2_sycoca_0p4b.py --topology=v5p-64

On the TPU VM slice (every worker runs the same command):

  launch/tpu_vm.sh --tpu=my-v5p-64 --zone=us-east5-a run -- \
      python launch/train.py --config=configs/m2_sycoca_0p4b.py --workdir=gs://BUCKET/m2_sycoca \
      --config.data.train_files='gs://BUCKET/shards/train-*.array_record' \
      --config.tokenizer.path=/path/to/glm_chinese_sp.model \
      --config.evals.coco_captions.source=coco:/data/coco/annotations/captions_val2017.json \
      --config.evals.coco_captions.data_dir=/data/coco/val2017
"""

from bigvl.evaluators import kinds
from bigvl.systems.m2_encoder import config as m2_config
from bigvl.train import config_lib


def get_config():
  c = m2_config.pretrain_on_shards("0.4B", batch_size=8192, system="sycoca")
  # Decoders of a quarter of the towers' depth at their width (CoCa's captioner is 12 of 24 layers;
  # the towers here are 12 deep).
  c.model.decoder_depth = 3
  c.model.mim_depth = 2
  c.tokenizer.max_len = 52
  c.evals.coco_captions = kinds.eval_config(kind="captioning", source="", split="test")
  return config_lib.finalize(c)
