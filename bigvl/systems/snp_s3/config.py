"""SNP-S3's config keys: the video backbone and the shared BERT, the pretraining losses (MSSM or
plain MLM, LVWM, MoCo contrast, ITM) and the QA fine-tuning task."""

from __future__ import annotations

import glob
import os

import ml_collections

from bigvl.evaluators import kinds
from bigvl.models.layers import video
from bigvl.train import config_lib

ConfigError = config_lib.ConfigError
TASKS = ("pretrain", "qa")
MASKING = ("significant", "random")


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "pretrain"              # "pretrain" (MSSM/MLM + LVWM + MoCo + ITM) or "qa"
  c.model = ml_collections.ConfigDict(dict(
      width=128, depth=4, heads=4, mlp_dim=512,     # the shared BERT
      embed_dim=128,                                # the contrastive space
      frame_size=32, patch_size=8,                  # the per-frame ViT
      vit_width=128, vit_depth=2, vit_heads=4,
      temporal="transformer", temporal_depth=1,     # the video tower's mixing
      clip_groups=4,                                # visual tokens per video (frames / groups each)
      patch_grid=0,                                 # > 0: each group's patch tokens too, pooled
                                                    # to a g×g grid (cross-modal encoder only)
      init_std=0.02, dtype="float32", attention="xla",
      vocab_size=0,                                 # 0: the tokenizer's (set it to plan without
                                                    # data: launch/plan.py)
  ))
  c.tokenizer = ml_collections.ConfigDict(dict(path="", max_len=32))
  c.data = ml_collections.ConfigDict(dict(
      kind="video_world",          # or "shards": video records from launch/build_shards.py
      dir="",                      # video_world: "" = the cache
      train_files="",              # shards: a glob of ArrayRecord files
      num_frames=8,
      min_frames=1,
      significant_words="",        # a word file (launch/significant_words.py); "": the video
                                   # world's, mined from its captions
      qa_choices=4,                # K of multiple-choice QA (items with fewer are padded)
      worker_count=0,
      max_skip_fraction=0.05,
      world=ml_collections.ConfigDict(dict(
          seed=0, num_train=8000, num_eval=400, num_shards=4, fps=4)),
  ))
  c.loss = ml_collections.ConfigDict(dict(
      masking="significant",       # MSSM ("significant") or plain MLM ("random": any real token)
      mask_ratio=0.15, p_mask=0.8, p_variant=0.1,
      mlm_weight=1.0,
      lvwm_weight=1.0, lvwm_words=3,
      itc_weight=1.0,              # MoCo text <-> video contrast
      itm_weight=1.0,              # matching with one hard false caption
      temperature=0.05,
      queue_size=16384,            # the authors'; the CPU demo uses fewer
      momentum=0.9999,             # the authors'; the CPU demo uses less
      qa_mc_weight=1.0,            # task "qa"
      qa_open_weight=1.0,
  ))
  c.qa = ml_collections.ConfigDict(dict(
      answers="",                  # the open answer vocabulary (one per line); "": the world's
  ))
  # task "qa" with init_from "": the pretraining run trained first (backbone.DEMOS), or "" for
  # none (from nothing).
  c.backbone = ml_collections.ConfigDict(dict(config="", dir=""))
  c.evals = ml_collections.ConfigDict(dict(
      video_retrieval=kinds.eval_config(kind="video_retrieval", source="world", split="eval",
                                        text_weights="uniform"),
      video_qa=kinds.eval_config(kind="video_qa", source="world", split="eval"),
  ))
  return c


def validate(c: ml_collections.ConfigDict, *, check_paths: bool = True,
             training: bool = True) -> None:
  def need(cond: bool, msg: str):
    if not cond:
      raise ConfigError(msg)
  need(c.task in TASKS, f"task={c.task!r}: use one of {list(TASKS)}")
  need(c.model.temporal in video.TEMPORAL,
       f"model.temporal={c.model.temporal!r}: use one of {list(video.TEMPORAL)}")
  need(c.data.num_frames >= 1 and c.data.num_frames % c.model.clip_groups == 0,
       f"data.num_frames={c.data.num_frames} must be a positive multiple of "
       f"model.clip_groups={c.model.clip_groups}")
  need(c.model.frame_size % c.model.patch_size == 0,
       f"model.frame_size={c.model.frame_size} is not a multiple of model.patch_size="
       f"{c.model.patch_size}")
  side = c.model.frame_size // c.model.patch_size
  need(c.model.patch_grid >= 0 and (not c.model.patch_grid or side % c.model.patch_grid == 0),
       f"model.patch_grid={c.model.patch_grid} does not divide the {side}x{side} patches")
  need(c.model.width % c.model.heads == 0 and c.model.vit_width % c.model.vit_heads == 0,
       "model.width / heads and vit_width / vit_heads must divide")
  need(c.data.kind in ("video_world", "shards"),
       f"data.kind={c.data.kind!r}: use 'video_world' or 'shards'")
  if c.data.kind == "shards" and training:
    need(bool(c.data.train_files), "data.kind='shards' needs data.train_files")
    need(bool(c.tokenizer.path) or bool(c.init_from),
         "data.kind='shards' needs tokenizer.path (or init_from, whose tokenizer it takes)")
    need(bool(c.data.significant_words) or c.task != "pretrain",
         "data.kind='shards' needs data.significant_words (launch/significant_words.py)")
    need(not check_paths or bool(glob.glob(c.data.train_files)),
         f"data.train_files={c.data.train_files!r} matches no file")
  for key in ("tokenizer.path", "data.significant_words", "qa.answers"):
    section, name = key.split(".")
    path = c[section][name]
    need(not check_paths or not path or os.path.isfile(path), f"{key}={path!r} does not exist")
  need(c.loss.masking in MASKING, f"loss.masking={c.loss.masking!r}: use one of {list(MASKING)}")
  need(0 < c.loss.mask_ratio <= 1, f"loss.mask_ratio={c.loss.mask_ratio}: in (0, 1]")
  need(0 <= c.loss.p_mask and 0 <= c.loss.p_variant and c.loss.p_mask + c.loss.p_variant <= 1,
       f"loss.p_mask={c.loss.p_mask}, loss.p_variant={c.loss.p_variant}: probabilities summing "
       "to at most 1")
  need(c.loss.queue_size >= c.batch_size,
       f"loss.queue_size={c.loss.queue_size} < batch_size={c.batch_size}: a step would overwrite "
       "its own keys")
  need(0 <= c.loss.momentum < 1, f"loss.momentum={c.loss.momentum}: in [0, 1)")
  need(c.loss.temperature > 0, f"loss.temperature={c.loss.temperature}: > 0")
  need(c.loss.lvwm_words >= 1, f"loss.lvwm_words={c.loss.lvwm_words}: >= 1")
  need(c.data.qa_choices >= 2, f"data.qa_choices={c.data.qa_choices}: >= 2")
  need(c.get("loss", {}).get("accum_steps", 1) == 1, "SNP-S3 takes no loss.accum_steps")
  if c.task == "qa" and not c.init_from and c.backbone.config:
    from bigvl.systems import backbone
    try:
      backbone.demo_config(c.backbone.config)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  try:
    kinds.validate_entries(c.evals, has_world=c.data.kind == "video_world",
                           check_paths=check_paths)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def tiny_demo() -> ml_collections.ConfigDict:
  """Pretraining on the video world on CPU (configs/snp_s3_tiny.py)."""
  c = config_lib.full_config("snp_s3")
  c.model.update(dict(width=96, depth=3, heads=4, mlp_dim=384, embed_dim=96, vit_width=96,
                      vit_depth=2, vit_heads=4))
  # From nothing at std 0.02 the clip features stayed alike: after 225 steps LVWM was still at
  # log(32) and the contrast at chance; at 0.2 both learn (README, SNP-S3).
  c.model.init_std = 0.2
  c.loss.queue_size = 1024
  c.loss.momentum = 0.99
  c.batch_size = 32
  c.total_steps = 500
  c.checkpoint_every = 500
  c.log_every = 25
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  return c


def qa_demo() -> ml_collections.ConfigDict:
  """QA fine-tuning from the pretraining demo (configs/snp_s3_qa_tiny.py)."""
  c = tiny_demo()
  c.task = "qa"
  c.backbone.config = "snp_s3_tiny"
  c.total_steps = 800
  c.checkpoint_every = 800
  c.evals.video_retrieval.source = ""
  # New clips of seen compositions beside the held-out ones: what is learnt at all, and what
  # carries over to unseen (shape, action) pairs and event orders.
  c.evals.video_qa_seen = kinds.eval_config(kind="video_qa", source="world", split="eval_seen")
  return c
