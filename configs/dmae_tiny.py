"""DMAE + NegNCE + TPM-CL tiny: text–video retrieval trained on CPU on the embedded video world.

  python launch/train.py --config=configs/dmae_tiny.py --workdir=workdirs/dmae_tiny

From nothing (tiny M²-Encoder towers at 32 px with a 2-layer seqTransf); --config.init_from=W
starts the towers from an M²-Encoder run W (e.g. configs/m2_tiny.py's; its sizes, frame size and
tokenizer are then the run's). Evaluated on held-out compositions of the video world, whose clips
come in time-mirrored pairs: video_retrieval/{t2v,v2t}/r1 beside video_retrieval/chance/*.
"""

from bigvl.systems.dmae import config as dmae_config
from bigvl.train import config_lib


def get_config():
  return config_lib.finalize(dmae_config.tiny_demo())
