"""M²-Encoder's config keys (under the loop's, bigvl.train.config_lib) and their validation."""

from __future__ import annotations

import glob
import math
import os

import ml_collections
from ml_collections import config_dict

from bigvl.evaluators import kinds
from bigvl.train import config_lib

ConfigError = config_lib.ConfigError


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
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
      dtype="float32",            # compute dtype of matmuls and activations ("bfloat16": mixed
                                  # precision; LayerNorm, softmax and loss statistics stay float32)
      param_dtype="float32",      # parameters (and so the optimizer state)
      eval_dtype="float32",       # compute dtype of evaluation ("": model.dtype): the released
                                  # models' figures are float32 ones, bf16 moves embeddings ~1e-3
      attention="xla",            # a key of bigvl.models.layers.attention.ATTENTION ("cudnn" on GPUs)
      remat=False,                # rematerialise each layer in the backward pass ...
      remat_policy="full",        # ... keeping a key of bigvl.models.layers.stack.REMAT_POLICIES
      scan_layers=False,          # each stack as one lax.scan: compile time flat in depth
  ))

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
      world=ml_collections.ConfigDict(dict(
          seed=0, num_train=60000, num_eval=1200, num_shards=8, vocab_size=384)),
  ))

  # Evaluations on the embedded world's held-out combinations.
  # classes="split": the candidates are the classes of the split (for eval_heldout, only
  # combinations never trained on: the zero-shot protocol); "all": every class of the world,
  # seen ones included (the generalised protocol, where memorised pairs compete).
  c.evals = ml_collections.ConfigDict(dict(
      zeroshot=kinds.eval_config(kind="zeroshot", classes="split"),
      zeroshot_all=kinds.eval_config(kind="zeroshot", classes="all"),
      retrieval=kinds.eval_config(kind="retrieval"),
  ))
  return c


def tiny_demo(system: str = "m2_encoder") -> ml_collections.ConfigDict:
  """The tiny towers and schedule of the CPU demo on the embedded world (configs/m2_tiny.py), for
  `system` (configs/sycoca_tiny.py starts from them too)."""
  c = config_lib.full_config(system)
  c.model.variant = "tiny"
  # The world's captions are at most 27 tokens ([CLS] and <|endoftext|> included): 28 keeps every
  # caption whole and the text tower half as costly as at the released length of 52.
  c.tokenizer.max_len = 28
  # 6-px patches (8 x 8 of them at 48 px) for the two and three small objects of many pictures. A
  # step costs 1.5 times as much as with the variant's 8-px patches; 450 steps of them did about as
  # well as or better than 600 of 8 px in two paired runs on two drafts of the world (held-out
  # top-1 en / zh: 0.85 / 0.84 against 0.81 / 0.80, and 0.78 / 0.74 against 0.76 / 0.75), in a
  # little more time.
  c.model.patch_size = 6
  # A wider init than the released 0.02 (which, truncated at 1σ, is ≈0.011): a 3-layer ViT trained
  # for a few hundred steps barely moves off chance on shape at 0.011, and learns it at ≈0.1
  # (measured with a supervised shape probe: 19% vs 51% after 150 steps).
  c.model.init_std = 0.2
  c.batch_size = 128
  c.total_steps = 450
  c.checkpoint_every = 150
  c.log_every = 25
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 50
  return c


def pretrain_on_shards(variant: str, batch_size: int,
                       system: str = "m2_encoder") -> ml_collections.ConfigDict:
  """M²-Encoder contrastive pretraining of a released size on shards from launch/build_shards.py
  (`system`: another system on M²-Encoder's towers, e.g. "sycoca").

  The run needs `data.train_files` and `tokenizer.path` (the GLM SentencePiece model) on the
  command line; validation says so otherwise.
  """
  c = config_lib.full_config(system)
  c.model.variant = variant
  c.batch_size = batch_size
  c.total_steps = 100_000
  c.checkpoint_every = 1000
  c.log_every = 50
  c.optim.lr = 5e-4
  c.optim.warmup_steps = 2000
  c.data.kind = "shards"
  c.data.worker_count = 8
  # Pod defaults (launch/plan.py shows the fit per slice): parameters and optimizer state sharded
  # over every chip, bfloat16 compute with float32 parameters, each stack one scanned and
  # rematerialised layer (compile time flat in depth, activations of one layer at a time).
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.model.dtype = "bfloat16"
  c.model.scan_layers = True
  c.model.remat = True
  # The paper's benchmarks, off until given data (shared/docs/m2_encoder.md has the protocol), e.g.
  #   --config.evals.flickr30k_cn.source=jsonl:/data/f30k-cn_test.jsonl
  #   --config.evals.imagenet.source=tfds:imagenet2012 --config.evals.imagenet.data_dir=DIR
  #   --config.evals.imagenet.classnames=en:imagenet_en.txt
  E = kinds.eval_config
  c.evals = ml_collections.ConfigDict(dict(
      imagenet=E(kind="zeroshot", source="", split="validation", langs="en"),
      imagenet_cn=E(kind="zeroshot", source="", split="validation", langs="zh"),
      flickr30k=E(kind="retrieval", source="", split="test"),
      flickr30k_cn=E(kind="retrieval", source="", split="test"),
      coco=E(kind="retrieval", source="", split="test"),
      coco_cn=E(kind="retrieval", source="", split="test"),
  ))
  return c


def _is_local(path: str) -> bool:
  return "://" not in path  # gs://… and other remote paths are checked when they are opened


def validate(c: ml_collections.ConfigDict, *, check_paths: bool = True,
             training: bool = True) -> None:
  """M²-Encoder's one-line ConfigErrors (the loop's keys are checked by config_lib.validate).
  `training=False` (evaluating a checkpoint) needs no training shards, and no tokenizer.path (an
  imported or trained checkpoint carries its own)."""
  def need(cond: bool, msg: str):
    if not cond:
      raise ConfigError(msg)
  from bigvl.models import m2_encoder
  from bigvl.models.layers import attention, stack
  need(c.model.variant in m2_encoder.VARIANTS,
       f"model.variant={c.model.variant!r}: use one of {sorted(m2_encoder.VARIANTS)}")
  need(c.data.kind in ("synthetic_world", "shards"),
       f"data.kind={c.data.kind!r}: use 'synthetic_world' or 'shards'")
  need(c.data.kind != "synthetic_world" or not c.data.train_files,
       f"data.train_files={c.data.train_files!r} is set but data.kind='synthetic_world' trains on "
       "the embedded world: add --config.data.kind=shards (and --config.tokenizer.path=...) to "
       "train on your shards, or drop data.train_files")
  if c.data.kind == "shards" and check_paths and training:
    need(bool(c.data.train_files), "data.kind='shards' needs data.train_files (a glob of shards)")
    need(bool(c.tokenizer.path), "data.kind='shards' needs tokenizer.path (a SentencePiece model)")
    need(not _is_local(c.data.train_files) or bool(glob.glob(c.data.train_files)),
         f"data.train_files={c.data.train_files!r} matches no file: point it at the shards "
         "written by launch/build_shards.py")
  need(not check_paths or not c.tokenizer.path or not _is_local(c.tokenizer.path)
       or os.path.isfile(c.tokenizer.path),
       f"tokenizer.path={c.tokenizer.path!r} does not exist: point it at a SentencePiece model")
  need(c.loss.impl in ("ring", "dense"), f"loss.impl={c.loss.impl!r}: use 'ring' or 'dense'")
  for key in ("dtype", "param_dtype", "eval_dtype"):
    if key == "eval_dtype" and not c.model.eval_dtype:
      continue
    need(c.model[key] in ("float32", "bfloat16", "float16"),
         f"model.{key}={c.model[key]!r}: use 'float32', 'bfloat16' or 'float16'")
  need(c.model.attention in attention.ATTENTION,
       f"model.attention={c.model.attention!r}: use one of {sorted(attention.ATTENTION)}")
  need(c.model.attention != "cudnn" or c.model.dtype in ("bfloat16", "float16"),
       "model.attention='cudnn' needs model.dtype='bfloat16' (or 'float16')")
  need(c.model.remat_policy in stack.REMAT_POLICIES,
       f"model.remat_policy={c.model.remat_policy!r}: use one of {sorted(stack.REMAT_POLICIES)}")
  need(c.loss.impl == "ring" or c.loss.group_size == 0,
       "loss.group_size needs loss.impl='ring' (the dense loss is global)")
  need(c.loss.group_size >= 0, f"loss.group_size={c.loss.group_size}: 0 (all devices) or a divisor "
       "of the number of batch shards")
  for name, ev in c.evals.items():
    try:
      kinds.validate_entry(name, ev, has_world=c.data.kind == "synthetic_world",
                           check_paths=check_paths)
    except ValueError as e:
      raise ConfigError(str(e)) from None
