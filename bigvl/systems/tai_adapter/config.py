"""The text-as-image adapter's config keys: the frozen towers (sized by the backbone it starts
from), the adapter, the label sentences and labels, the perturbation and the multi-label loss."""

from __future__ import annotations

import os

import ml_collections

from bigvl.evaluators import kinds
from bigvl.losses import multilabel
from bigvl.models import tai_adapter
from bigvl.systems import backbone
from bigvl.systems.m2_encoder import config as m2_config
from bigvl.train import config_lib

ConfigError = config_lib.ConfigError


def default_config() -> ml_collections.ConfigDict:
  m2 = m2_config.default_config()
  c = ml_collections.ConfigDict()
  # The towers' keys are M²-Encoder's; a backbone run's own sizes win (its config.json).
  c.model = m2.model
  c.model.update(dict(
      adapter_dim=0,              # bottleneck width (0: the embedding's)
      adapter_activation="gelu",
      init_scale=10.0,            # exp(logit_scale) at init (learned)
      init_bias=-5.0,             # logit_bias at init (learned)
  ))
  c.tokenizer = m2.tokenizer      # a backbone run's pinned tokenizer wins
  c.data = m2.data
  c.data.update(dict(
      # "synthetic_world": the world's 40 (colour, shape) labels, sentences made from templates in
      # prepare, evaluated on the scene world; "sentences": your own files below.
      sentences="",               # JSON lines {"text", "labels": [names], "lang"} (launch/
                                  # generate_label_sentences.py); "" = generated for the world
      labels="",                  # the label set: one name per line ("english<TAB>chinese")
      num_sentences=20000,        # generated for the world
      min_labels=1, max_labels=4,
      langs="en,zh",              # languages of generated sentences
      label_templates="simple",   # the label prompts (evaluators/templates.py name or JSON file)
      label_langs="en,zh",        # prompt languages averaged into a label's embedding
      # The scene world (data_pipelines/scene_world.py) the world's evaluations read.
      scenes=ml_collections.ConfigDict(dict(num_train=30000, num_eval=1000, num_shards=4)),
  ))
  c.loss = ml_collections.ConfigDict(dict(
      kind="bce",                 # "bce" or "asl" (asymmetric loss)
      asl_gamma_pos=0.0, asl_gamma_neg=4.0, asl_clip=0.05,
      noise="relative",           # "none", "gaussian" (std per coordinate) or "relative" (std·‖e‖)
      noise_std=1.0,
  ))
  c.backbone = backbone.default_config()
  c.init_from_into = "towers"     # a plain M²-Encoder run goes into the towers
  c.evals = ml_collections.ConfigDict(dict(multilabel=kinds.eval_config(kind="multilabel")))
  return c


def validate(c: ml_collections.ConfigDict, *, check_paths: bool = True,
             training: bool = True) -> None:
  from bigvl.systems import on_towers

  def need(cond: bool, msg: str):
    if not cond:
      raise ConfigError(msg)
  need(c.data.kind in ("synthetic_world", "sentences"),
       f"data.kind={c.data.kind!r}: use 'synthetic_world' or 'sentences'")
  if c.data.kind == "sentences" and training:
    need(bool(c.data.sentences and c.data.labels),
         "data.kind='sentences' needs data.sentences (JSON lines) and data.labels (a label file)")
  for key in ("sentences", "labels"):
    need(not check_paths or not c.data[key] or os.path.isfile(c.data[key]),
         f"data.{key}={c.data[key]!r} does not exist")
  need(c.data.kind != "sentences" or bool(c.init_from) or not training,
       "data.kind='sentences' needs init_from (the trained towers, e.g. an M²-Encoder run or a "
       "parameter directory from launch/import_torch.py)")
  need(1 <= c.data.min_labels <= c.data.max_labels,
       f"data.min_labels={c.data.min_labels}, max_labels={c.data.max_labels}: need 1 <= min <= max")
  need(c.loss.kind in multilabel.LOSSES,
       f"loss.kind={c.loss.kind!r}: use one of {sorted(multilabel.LOSSES)}")
  need(c.loss.noise in tai_adapter.NOISE,
       f"loss.noise={c.loss.noise!r}: use one of {list(tai_adapter.NOISE)}")
  need(c.loss.noise_std >= 0, f"loss.noise_std={c.loss.noise_std}: must be >= 0")
  need(c.model.init_scale > 0, f"model.init_scale={c.model.init_scale}: must be > 0")
  on_towers.validate_towers(c, has_world=c.data.kind == "synthetic_world",
                            check_paths=check_paths)
