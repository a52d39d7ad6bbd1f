"""DMAE + NegNCE + TPM-CL's config keys: M²-Encoder's towers with a video tower, the video data, the
similarity's cues and the losses (the paper's full method is the default)."""

from __future__ import annotations

import glob
import os

import ml_collections

from bigvl.evaluators import kinds
from bigvl.models.layers import video
from bigvl.systems.m2_encoder import config as m2_config
from bigvl.train import config_lib

ConfigError = config_lib.ConfigError
LOSSES = ("negnce", "infonce")
PARTIAL_TYPES = (0, 2, 3, 4)     # 0: TPM-CL off


def default_config() -> ml_collections.ConfigDict:
  m2 = m2_config.default_config()
  c = ml_collections.ConfigDict()
  c.model = m2.model
  c.model.update(dict(
      temporal="transformer",      # "mean" (no temporal mixing) or "transformer" (seqTransf)
      temporal_depth=4,            # CLIP4Clip's seqTransf: 4 layers
      temporal_heads=4,
      temporal_init_std=0.02,
  ))
  c.tokenizer = m2.tokenizer
  c.tokenizer.max_len = 32         # the paper's 30 text tokens, plus [CLS] and EOS
  c.data = ml_collections.ConfigDict(dict(
      kind="video_world",          # or "shards": video records from launch/build_shards.py
      dir="",                      # video_world: "" = $BIGVL_VIDEO_DIR or ~/.cache/bigvl/...
      train_files="",              # shards: a glob of ArrayRecord files
      num_frames=8,                # frames per clip (uniformly sampled from longer records)
      min_frames=1,                # records with fewer frames are skipped (and counted)
      drop_words=5,                # DMAE: drop up to this many low-weight words per caption
                                   # (at most half of them) in training; 0 = off
      worker_count=0,
      max_skip_fraction=0.05,
      world=ml_collections.ConfigDict(dict(
          seed=0, num_train=8000, num_eval=400, num_shards=4, fps=4)),
  ))
  c.loss = ml_collections.ConfigDict(dict(
      kind="negnce",               # "negnce" or "infonce" (plain symmetric InfoNCE)
      scale=100.0,                 # logit scale of both: fixed (the authors' 100, from CLIP's
                                   # weights), or 0: the towers' learned one (from nothing)
      w_neg=0.5,                   # NegNCE's weight of the hard-negative term
      margin=0.0,                  # NegNCE's margin in the hard-set test
      visual_cue=True,             # DMAE: the most similar other frame's term
      cue_scale=0.5,
      textual_cue=True,            # DMAE: keywords weigh 2 (and drop_words in training)
      partial_type=4,              # TPM-CL: 2, 3, 4 (all), 0 off
      tpm_threshold=0.6,           # cumulative weight of the top tokens zeroed
      tpm_margin=0.6,
      tpm_weight=1.0,
      tpm_relative=True,           # weigh the margins by scale / 100: at the authors' fixed scale
                                   # of 100 the same; with a smaller (learned) scale the two
                                   # gradients keep the authors' ratio (README, DMAE: measured)
  ))
  c.keywords = ml_collections.ConfigDict(dict(
      english="default",           # "default": stop words + lexicon (bigvl/data/keywords.py)
  ))
  c.init_from_into = "towers"      # an M²-Encoder run loads into the towers
  c.evals = ml_collections.ConfigDict(dict(
      video_retrieval=kinds.eval_config(kind="video_retrieval", source="world", split="eval"),
  ))
  return c


def validate(c: ml_collections.ConfigDict, *, check_paths: bool = True,
             training: bool = True) -> None:
  from bigvl.models import m2_encoder

  def need(cond: bool, msg: str):
    if not cond:
      raise ConfigError(msg)
  need(c.model.variant in m2_encoder.VARIANTS,
       f"model.variant={c.model.variant!r}: use one of {sorted(m2_encoder.VARIANTS)}")
  need(c.model.temporal in video.TEMPORAL,
       f"model.temporal={c.model.temporal!r}: use one of {list(video.TEMPORAL)}")
  need(c.model.temporal_depth >= 1, f"model.temporal_depth={c.model.temporal_depth}: >= 1")
  need(c.data.kind in ("video_world", "shards"),
       f"data.kind={c.data.kind!r}: use 'video_world' or 'shards'")
  if c.data.kind == "shards" and training:
    need(bool(c.data.train_files), "data.kind='shards' needs data.train_files (a glob of video "
         "shards from launch/build_shards.py)")
    need(bool(c.tokenizer.path) or bool(c.init_from),
         "data.kind='shards' needs tokenizer.path (a SentencePiece model) or init_from (whose "
         "tokenizer it takes)")
    need(not check_paths or bool(glob.glob(c.data.train_files)),
         f"data.train_files={c.data.train_files!r} matches no file")
  need(not check_paths or not c.tokenizer.path or os.path.isfile(c.tokenizer.path),
       f"tokenizer.path={c.tokenizer.path!r} does not exist")
  need(c.data.num_frames >= 1, f"data.num_frames={c.data.num_frames}: >= 1")
  need(1 <= c.data.min_frames <= c.data.num_frames,
       f"data.min_frames={c.data.min_frames}: between 1 and data.num_frames")
  need(c.data.drop_words >= 0, f"data.drop_words={c.data.drop_words}: >= 0")
  need(c.loss.kind in LOSSES, f"loss.kind={c.loss.kind!r}: use one of {list(LOSSES)}")
  need(c.loss.partial_type in PARTIAL_TYPES,
       f"loss.partial_type={c.loss.partial_type}: use one of {list(PARTIAL_TYPES)} (0: off)")
  need(0 < c.loss.tpm_threshold < 1, f"loss.tpm_threshold={c.loss.tpm_threshold}: in (0, 1)")
  need(c.loss.tpm_weight >= 0, f"loss.tpm_weight={c.loss.tpm_weight}: >= 0")
  need(c.loss.scale >= 0, f"loss.scale={c.loss.scale}: > 0, or 0 (learned)")
  need(c.keywords.english in ("default",),
       f"keywords.english={c.keywords.english!r}: use 'default'")
  try:
    kinds.validate_entries(c.evals, has_world=c.data.kind == "video_world",
                           check_paths=check_paths)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def tiny_demo() -> ml_collections.ConfigDict:
  """The CPU demo on the video world (configs/dmae_tiny.py): tiny towers from nothing."""
  c = config_lib.full_config("dmae")
  c.model.variant = "tiny"
  c.model.image_size = 32
  c.model.patch_size = 8
  c.model.init_std = 0.2
  c.model.temporal_depth = 2
  # From nothing a fixed scale of 100 collapses every similarity to one value within 75 steps
  # (loss log(64), batch accuracy 1/64): the learned temperature, as M²-Encoder's towers train.
  c.loss.scale = 0.0
  c.batch_size = 64
  c.total_steps = 400
  c.checkpoint_every = 400
  c.log_every = 25
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 40
  return c
