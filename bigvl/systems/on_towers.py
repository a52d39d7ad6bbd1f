"""What systems built on trained M²-Encoder towers share (the text-as-image adapter, Switch-BERT):
the backbone they start from (`init_from`, or one trained first: bigvl.systems.backbone), its
sizes and tokenizer adopted into the run's config, and the scene world their evaluations (and
Switch-BERT's training) read.

`prepare_towers(workdir)` does it all; a subclass adds its own data after it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from typing import Any, Sequence

import jax

from bigvl.evaluators import build as eval_build
from bigvl.evaluators import kinds
from bigvl.models import m2_encoder
from bigvl.systems import backbone, base
from bigvl.systems.m2_encoder.system import M2EncoderSystem, pin_tokenizer
from bigvl.train import config_lib


def backbone_model_keys(source: str) -> dict[str, Any]:
  """The towers' sizes and text length a backbone was trained with: a workdir's config.json, or a
  parameter directory's (launch/import_torch.py); {} when it records none."""
  from bigvl.export import params_io
  fields = {f.name for f in dataclasses.fields(m2_encoder.M2Config)}
  if params_io.is_params_dir(source):
    doc = params_io.read_config(source)
    model = {k: v for k, v in doc.get("model", {}).items() if k != "vocab_size"}
    return {"model": model, "max_len": doc.get("tokenizer", {}).get("max_len")}
  path = os.path.join(source, "config.json")
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    doc = json.load(f)
  model = {k: v for k, v in doc.get("model", {}).items() if k in fields or k == "variant"}
  return {"model": model, "max_len": doc.get("tokenizer", {}).get("max_len"),
          "lowercase": doc.get("tokenizer", {}).get("lowercase")}


def validate_towers(c, *, has_world: bool, check_paths: bool) -> None:
  """The checks every system on towers shares: the towers' variant, the backbone to train when
  init_from is empty, and the eval entries (one-line ConfigErrors)."""
  from bigvl.models import m2_encoder as m2
  if c.model.variant not in m2.VARIANTS:
    raise config_lib.ConfigError(f"model.variant={c.model.variant!r}: use one of "
                                 f"{sorted(m2.VARIANTS)}")
  try:
    if not c.init_from:
      backbone.demo_config(c.backbone.config)
    for name, ev in c.evals.items():
      kinds.validate_entry(name, ev, has_world=has_world, check_paths=check_paths)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None


class TowersSystem(M2EncoderSystem):
  """M²-Encoder's towers (frozen or not) under a system's own heads; `self.scene_dir` is the scene
  world beside the image world (data.kind "synthetic_world"). The protocol's defaults, not
  M²-Encoder's GradCache and temperature clamp; `PREDICTORS` are the names `predictors` gives."""

  PREDICTORS: tuple[str, ...] = ()
  value_and_grad = base.System.value_and_grad

  def __init__(self, config, mesh, rules):
    super().__init__(config, mesh, rules)
    self.scene_dir = ""

  def post_update(self, params, extra, step):
    return params, extra

  def evaluators(self, only: Sequence[str] | None = None) -> dict[str, Any]:
    return eval_build.build_all(self.config.evals, tokenizer=self.tokenizer,
                                image_size=self.image_size(), world_dir=self.scene_dir,
                                only=only, predictors=self.PREDICTORS)

  def flops_per_example(self) -> float | None:
    return None

  def forward_flops_by_part(self) -> dict[str, int]:
    return {}

  def _adopt_backbone(self, source: str) -> None:
    """The towers' sizes and text length of the backbone at `source`, into this run's config."""
    keys = backbone_model_keys(source)
    c = self.config
    for k, v in keys.get("model", {}).items():
      if k in c.model and v is not None and c.model[k] != v:
        c.model[k] = v
    if keys.get("max_len"):
      c.tokenizer.max_len = keys["max_len"]
    if keys.get("lowercase") is not None:
      c.tokenizer.lowercase = keys["lowercase"]

  def _tokenizer_path(self, source: str) -> str:
    from bigvl.export import params_io
    c = self.config
    pinned = os.path.join(source, "tokenizer.model") if source else ""
    if pinned and os.path.exists(pinned):
      return pinned
    if source and params_io.is_params_dir(source) and not c.tokenizer.path:
      return os.path.join(source, params_io.read_config(source)["tokenizer"]["file"])
    if c.tokenizer.path:
      return c.tokenizer.path
    if c.data.kind == "synthetic_world":
      return os.path.join(self.data_dir, "tokenizer.model")
    raise ValueError("set --config.tokenizer.path to the towers' SentencePiece model")

  def _build_scenes(self) -> None:
    from data_pipelines import build_scenes
    self.scene_dir = str(build_scenes.default_dir(self.data_dir))
    if jax.process_index() == 0:
      sc = self.config.data.scenes
      build_scenes.build(self.scene_dir, seed=self.config.data.world.seed,
                         image_size=self.image_size(), num_train=sc.num_train,
                         num_eval=sc.num_eval, num_shards=sc.num_shards)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("bigvl_scenes_built")

  def prepare_towers(self, workdir: str | None) -> None:
    """Training (`workdir` given): the backbone present (trained first when init_from is empty).
    Then: the worlds built, the backbone's sizes and text length in this run's config, its
    tokenizer pinned in `workdir` and loaded."""
    c = self.config
    if workdir is not None:
      backbone.ensure(c)
    if c.data.kind == "synthetic_world":
      self._build_world()
      self._build_scenes()
    if c.init_from:
      self._adopt_backbone(c.init_from)
    tok_path = self._tokenizer_path(c.init_from)
    if workdir:
      tok_path = pin_tokenizer(workdir, tok_path)
    self.load_tokenizer(tok_path)

  def prepare_towers_for_checkpoint(self, source: str) -> None:
    """Evaluating a run of this system: its config (as `prepare_towers` wrote it) sizes the towers;
    its pinned tokenizer reads the texts."""
    if self.config.data.kind == "synthetic_world":
      self._build_world()
      self._build_scenes()
    self.load_tokenizer(self._tokenizer_path(source))
