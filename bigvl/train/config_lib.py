"""The keys every training config has, and their validation.

Config files in `configs/` call `base_config()` and change what they need. The returned ConfigDict is
locked: a misspelt key, in the file or on the command line (`--config.batch_sise=8`), is an error at
load time rather than a silently ignored setting.
"""

from __future__ import annotations

import math

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.system = "m2_encoder"         # a key of bigvl.systems.SYSTEMS
  c.seed = 0
  c.batch_size = 128              # global, over all processes and devices
  c.total_steps = 1000
  c.checkpoint_every = 250        # also saved at the end
  c.keep_checkpoints = 3
  c.log_every = 20
  c.init_from = ""                # a workdir or a params dir (launch/import_torch.py) to start from

  # Mesh axis sizes (-1: all remaining devices), in device-order, and the logical-axis rules.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.sharding_rules = config_dict.placeholder(tuple)  # None: bigvl.parallel.mesh.DEFAULT_RULES

  c.model = ml_collections.ConfigDict(dict(
      variant="tiny",             # a key of bigvl.models.m2_encoder.VARIANTS
      # Any field left None takes the variant's value.
      width=config_dict.placeholder(int),
      heads=config_dict.placeholder(int),
      depth=config_dict.placeholder(int),
      vl_depth=config_dict.placeholder(int),
      mlp_dim=config_dict.placeholder(int),
      out_dim=config_dict.placeholder(int),
      patch_size=config_dict.placeholder(int),
      image_size=config_dict.placeholder(int),
      text_positions=config_dict.placeholder(int),
      init_std=config_dict.placeholder(float),
      dtype="float32",
      remat=False,
  ))

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=100, min_lr_ratio=0.0, weight_decay=0.05,
      b1=0.9, b2=0.98, eps=1e-6, grad_clip_norm=1.0))

  c.loss = ml_collections.ConfigDict(dict(
      logit_scale_max=math.log(100.0),  # CLIP's clamp of the learned temperature
      impl="ring",                # "ring" (sharded, all-gather-free) or "dense" (exact oracle)
      group_size=0,               # devices per contrastive group of the ring loss; 0 = all (exact)
      accum_steps=1,              # GradCache micro-batches per step (same result, 1/K activations)
  ))

  c.tokenizer = ml_collections.ConfigDict(dict(
      path="",                    # "": the embedded world's tokenizer (built with the data)
      max_len=52,
      lowercase=True,
  ))

  c.data = ml_collections.ConfigDict(dict(
      kind="synthetic_world",     # or "shards"
      dir="",                     # synthetic_world: "" = $BIGVL_DATA_DIR or ~/.cache/bigvl/...
      train_files="",             # shards: a glob of ArrayRecord files made by launch/build_shards.py
      worker_count=0,             # grain worker processes per host
      world=ml_collections.ConfigDict(dict(
          seed=0, num_train=60000, num_eval=1200, num_shards=8, vocab_size=384)),
  ))

  # Evaluations: each has `every` (steps; 0 = only at the end of training).
  c.evals = ml_collections.ConfigDict(dict(
      # classes="split": the candidates are the classes of the split (for eval_heldout, only
      # combinations never trained on: the zero-shot protocol); "all": every class of the world,
      # seen ones included (the generalised protocol, where memorised pairs compete).
      zeroshot=ml_collections.ConfigDict(dict(every=0, split="eval_heldout", batch_size=256,
                                              classes="split")),
      zeroshot_all=ml_collections.ConfigDict(dict(every=0, split="eval_heldout", batch_size=256,
                                                  classes="all")),
      retrieval=ml_collections.ConfigDict(dict(every=0, split="eval_heldout", batch_size=256)),
  ))
  return c


def pretrain_on_shards(variant: str, batch_size: int) -> ml_collections.ConfigDict:
  """M²-Encoder contrastive pretraining of a released size on shards from launch/build_shards.py.

  The run needs `data.train_files` and `tokenizer.path` (the GLM SentencePiece model) on the
  command line; validation says so otherwise.
  """
  c = base_config()
  c.model.variant = variant
  c.batch_size = batch_size
  c.total_steps = 100_000
  c.checkpoint_every = 1000
  c.log_every = 50
  c.optim.lr = 5e-4
  c.optim.warmup_steps = 2000
  c.data.kind = "shards"
  c.data.worker_count = 8
  return c


def finalize(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.lock()
  return c


class ConfigError(ValueError):
  """A config that cannot run; the message says what to change."""


def validate(c: ml_collections.ConfigDict) -> None:
  """Checks that need no devices: run before anything is built or compiled."""
  def need(cond: bool, msg: str):
    if not cond:
      raise ConfigError(msg)
  need(c.batch_size > 0, f"batch_size={c.batch_size}: must be positive")
  need(c.total_steps > 0, f"total_steps={c.total_steps}: must be positive")
  need(c.checkpoint_every > 0, f"checkpoint_every={c.checkpoint_every}: must be positive")
  need(c.log_every > 0, f"log_every={c.log_every}: must be positive")
  need(c.data.kind in ("synthetic_world", "shards"),
       f"data.kind={c.data.kind!r}: use 'synthetic_world' or 'shards'")
  if c.data.kind == "shards":
    need(bool(c.data.train_files), "data.kind='shards' needs data.train_files (a glob of shards)")
    need(bool(c.tokenizer.path), "data.kind='shards' needs tokenizer.path (a SentencePiece model)")
  need(c.loss.impl in ("ring", "dense"), f"loss.impl={c.loss.impl!r}: use 'ring' or 'dense'")
  need(c.loss.impl == "ring" or c.loss.group_size == 0,
       "loss.group_size needs loss.impl='ring' (the dense loss is global)")
  need(c.loss.accum_steps >= 1, f"loss.accum_steps={c.loss.accum_steps}: must be >= 1")
  need(c.loss.group_size >= 0, f"loss.group_size={c.loss.group_size}: 0 (all devices) or a divisor "
       "of the number of batch shards")
  for name, ev in c.evals.items():
    need(ev.every >= 0, f"evals.{name}.every={ev.every}: must be >= 0")
