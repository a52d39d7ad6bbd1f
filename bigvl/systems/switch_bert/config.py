"""Switch-BERT's config keys: the towers that give the depth banks (M²-Encoder's keys, sized by the
backbone run), the fusion encoder, its mode and depth selection, the task weights, and the scene
world it trains and evaluates on."""

from __future__ import annotations

import ml_collections

from bigvl.evaluators import kinds
from bigvl.models import switch_bert
from bigvl.systems import backbone
from bigvl.systems.m2_encoder import config as m2_config
from bigvl.train import config_lib

ConfigError = config_lib.ConfigError


def default_config() -> ml_collections.ConfigDict:
  m2 = m2_config.default_config()
  c = ml_collections.ConfigDict()
  c.model = m2.model
  c.model.update(dict(
      fusion_width=64, fusion_heads=4, fusion_mlp_dim=256, fusion_depth=2,
      modes="learned",            # "learned" (mode and depth weights) or "joint" (the fixed
                                  # single-stream baseline: joint attention on current states)
      selection="softmax",        # "softmax" or "gumbel" (Gumbel-softmax in training)
      freeze_towers=True,         # the towers give fixed depth banks (False: fine-tuned too)
      image_pool=1,               # average-pool the image banks' patch grid by this factor (CLS
                                  # kept): fewer image tokens for the fusion layers
      refer_depths=True,          # the referring head also pools the image bank at every depth
                                  # (the objects' own features, not only the fused states)
      switch_lr_multiplier=20.0,  # the mode and depth logits' learning rate over optim.lr: Adam
                                  # moves a logit by about lr per step, so at lr 1e-3 a few hundred
                                  # steps leave them near uniform
  ))
  c.tokenizer = m2.tokenizer
  c.data = m2.data
  c.data.update(dict(
      scenes=ml_collections.ConfigDict(dict(num_train=30000, num_eval=1000, num_shards=4)),
      max_boxes=4,                # candidate boxes per referring expression
      langs="en,zh",
  ))
  c.loss = ml_collections.ConfigDict(dict(
      vqa_weight=1.0, itm_weight=1.0, refer_weight=1.0,
      # The selection temperature, annealed exponentially from tau_start to tau_end over the run
      # (evaluation uses tau_end, without noise).
      tau_start=1.0, tau_end=1.0,
  ))
  c.backbone = backbone.default_config()
  c.init_from_into = "towers"
  E = kinds.eval_config
  # The scene world's two held-out splits: "eval_pairs" (pairs of seen classes never seen
  # together) and "eval" (classes never seen; the `_classes` entries).
  c.evals = ml_collections.ConfigDict(dict(
      vqa=E(kind="vqa", split="eval_pairs"), referring=E(kind="referring", split="eval_pairs"),
      itm=E(kind="itm", split="eval_pairs"),
      vqa_classes=E(kind="vqa", split="eval"), referring_classes=E(kind="referring", split="eval"),
  ))
  return c


def validate(c: ml_collections.ConfigDict, *, check_paths: bool = True,
             training: bool = True) -> None:
  from bigvl.systems import on_towers

  def need(cond: bool, msg: str):
    if not cond:
      raise ConfigError(msg)
  need(c.data.kind == "synthetic_world",
       f"data.kind={c.data.kind!r}: Switch-BERT trains on the scene world ('synthetic_world'); "
       "public VQAv2 / RefCOCO files are evaluation sources (evals.*.source)")
  need(c.model.modes in switch_bert.MODES,
       f"model.modes={c.model.modes!r}: use one of {list(switch_bert.MODES)}")
  need(c.model.selection in switch_bert.SELECTIONS,
       f"model.selection={c.model.selection!r}: use one of {list(switch_bert.SELECTIONS)}")
  need(c.model.fusion_width % c.model.fusion_heads == 0,
       f"model.fusion_width={c.model.fusion_width} must split into fusion_heads="
       f"{c.model.fusion_heads}")
  need(c.model.fusion_depth >= 1, f"model.fusion_depth={c.model.fusion_depth}: must be >= 1")
  need(c.loss.tau_start > 0 and c.loss.tau_end > 0,
       f"loss.tau_start={c.loss.tau_start}, tau_end={c.loss.tau_end}: must be > 0")
  need(c.model.switch_lr_multiplier > 0,
       f"model.switch_lr_multiplier={c.model.switch_lr_multiplier}: must be > 0")
  need(c.model.image_pool >= 1, f"model.image_pool={c.model.image_pool}: must be >= 1")
  need(c.data.max_boxes >= 2, f"data.max_boxes={c.data.max_boxes}: must be >= 2")
  for key in ("vqa_weight", "itm_weight", "refer_weight"):
    need(c.loss[key] >= 0, f"loss.{key}={c.loss[key]}: must be >= 0")
  on_towers.validate_towers(c, has_world=True, check_paths=check_paths)
