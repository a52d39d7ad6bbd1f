"""TSGSV's config keys: the streaming grounder (memories, compressor, decoder, TwinNet), its
losses, and the grounding data (the stream world, or annotations + features)."""

from __future__ import annotations

import os

import ml_collections

from bigvl.evaluators import kinds
from bigvl.train import config_lib

ConfigError = config_lib.ConfigError
DATA_KINDS = ("stream_world", "json")


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(dict(
      width=128, heads=4, mlp_dim=256,
      text_depth=2,                # the query encoder's blocks
      decoder_depth=2,             # short window → compressed long memory
      compress=(16, 16),           # tokens of each compressor stage
      long=64, short=8, future=64, # memories, in frames (future: training only)
      twin=True,                   # TwinNet: the future-reading twin that teaches the main branch
      init_std=0.02, dtype="float32", attention="xla",
      feature_dim=0,               # 0: the features' (set it to plan without data)
      vocab_size=0,                # 0: the tokenizer's (set it to plan without data)
  ))
  c.tokenizer = ml_collections.ConfigDict(dict(path="", max_len=24))
  c.data = ml_collections.ConfigDict(dict(
      kind="stream_world",         # or "json": annotations + features
      dir="",                      # stream_world: "" = the cache
      train_json="",               # json: ActivityNet Captions (train.json) or TACoS style
      features="",                 # json: {video}.npy folder, "h5:FILE" or FILE.h5
      langs="en,zh",               # query languages trained on (where the file has them)
      worker_count=0,
      max_skip_fraction=0.05,
      world=ml_collections.ConfigDict(dict(seed=0, dim=64, noise=0.2, num_train=2000,
                                            num_val=200)),
  ))
  c.loss = ml_collections.ConfigDict(dict(
      gamma=3.0,                   # the focal factor |σ(z) − y|^γ
      channel_weights=(0.5, 0.5, 1.0),   # start, end, inside
      twin_lambda=0.4,             # main × (1 − λ) + twin × 1 + distillation × λ (authors:
                                   # 0.4 ActivityNet, 0.2 TACoS / MAD)
  ))
  c.evals = ml_collections.ConfigDict(dict(
      grounding=kinds.eval_config(kind="grounding", source="world", split="val"),
  ))
  return c


def validate(c: ml_collections.ConfigDict, *, check_paths: bool = True,
             training: bool = True) -> None:
  def need(cond: bool, msg: str):
    if not cond:
      raise ConfigError(msg)
  m = c.model
  need(m.width % m.heads == 0, f"model.width={m.width} is not a multiple of model.heads={m.heads}")
  need(m.width % 2 == 0, f"model.width={m.width} must be even (sinusoidal positions)")
  need(len(m.compress) >= 1 and all(int(n) >= 1 for n in m.compress),
       f"model.compress={tuple(m.compress)}: one or more positive token counts")
  need(m.long >= 1 and m.short >= 1 and m.future >= 1,
       f"model.long / short / future = {m.long} / {m.short} / {m.future}: all >= 1")
  need(c.data.kind in DATA_KINDS, f"data.kind={c.data.kind!r}: use one of {list(DATA_KINDS)}")
  bad = [lg for lg in str(c.data.langs).split(",") if lg not in ("en", "zh")]
  need(not bad, f"data.langs: {bad} not in en, zh")
  if c.data.kind == "json" and training:
    need(bool(c.data.train_json) and bool(c.data.features),
         "data.kind='json' needs data.train_json and data.features")
    need(bool(c.tokenizer.path) or bool(c.init_from),
         "data.kind='json' needs tokenizer.path (a SentencePiece model)")
    if check_paths:
      need(os.path.isfile(os.path.expanduser(c.data.train_json)),
           f"data.train_json={c.data.train_json!r} does not exist")
      feats = c.data.features[3:] if c.data.features.startswith("h5:") else c.data.features
      need(os.path.exists(os.path.expanduser(feats)),
           f"data.features={c.data.features!r} does not exist")
  need(not check_paths or not c.tokenizer.path or os.path.isfile(c.tokenizer.path),
       f"tokenizer.path={c.tokenizer.path!r} does not exist")
  need(0 <= c.loss.twin_lambda <= 1, f"loss.twin_lambda={c.loss.twin_lambda}: in [0, 1]")
  need(len(c.loss.channel_weights) == 3, "loss.channel_weights: three weights (start, end, inside)")
  need(c.get("loss", {}).get("accum_steps", 1) == 1, "TSGSV takes no loss.accum_steps")
  try:
    kinds.validate_entries(c.evals, has_world=c.data.kind == "stream_world",
                           check_paths=check_paths)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def tiny_demo() -> ml_collections.ConfigDict:
  """Grounding in the stream world on CPU (configs/tsgsv_tiny.py)."""
  c = config_lib.full_config("tsgsv")
  c.model.update(dict(width=96, heads=4, mlp_dim=192))
  c.data.world.num_val = 100
  c.batch_size = 32
  c.total_steps = 3000
  c.checkpoint_every = 3000
  c.log_every = 100
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 200
  return c
