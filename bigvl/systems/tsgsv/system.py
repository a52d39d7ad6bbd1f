"""TSGSV (arXiv 2308.07102) on the system protocol: temporal sentence grounding in streaming
video with a language-guided compressed long memory and TwinNet (`bigvl.models.tsgsv`).

Training examples are the non-overlapping short windows of each (video, query) with a random
phase per epoch (`bigvl.data.formats.grounding`); each window's frames get Gaussian start / end /
inside labels, and the loss (`bigvl.losses.grounding.focal_bce`) is
  twin on:   (1 − λ) · focal(main, labels) + focal(twin, labels) + λ · focal(main, σ(twin))
             (the twin's σ detached: it teaches, it is not taught)
  twin off:  focal(main, labels)
Evaluation and the streaming API score every frame with the window ending at it, never reading a
later frame (`StreamingGrounder`, the grounding evaluator).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from bigvl.data.formats import grounding
from bigvl.evaluators import build as eval_build
from bigvl.losses import grounding as grounding_loss
from bigvl.models import tsgsv as model_lib
from bigvl.systems import base
from bigvl.systems.m2_encoder.system import pin_tokenizer, tokenizer_source
from bigvl.systems.m2_encoder.system import vocab_size as shared_vocab_size
from bigvl.systems.tsgsv import config as tsgsv_config
from bigvl.tokenizers import glm

log = logging.getLogger("bigvl")
FEATURES_FILE = "features.json"     # the run's feature width, for evaluating its checkpoints


def build_stream_world(c: ml_collections.ConfigDict) -> str:
  """The stream world's directory for `c.data` (its `dir`, or the cache's), built if missing."""
  from data_pipelines import build_streams
  w = c.data.world
  data_dir = c.data.dir or str(build_streams.default_dir(w.dim))
  if jax.process_index() == 0:
    build_streams.build(data_dir, seed=w.seed, dim=w.dim, noise=w.noise, num_train=w.num_train,
                        num_val=w.num_val)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("bigvl_streams_built")
  return data_dir


class TSGSVSystem(base.System):
  name = "tsgsv"
  PREDICTORS = ("ground",)

  default_config = staticmethod(tsgsv_config.default_config)

  def __init__(self, config, mesh, rules):
    super().__init__(config, mesh, rules)
    self.tokenizer: glm.GLMTokenizer | None = None
    self.data_dir = ""
    self.queries: list[grounding.Query] = []
    self.store: grounding.FeatureStore | None = None
    self.lengths: dict[str, int] = {}
    self._feature_dim = 0

  @classmethod
  def validate(cls, config, *, check_paths: bool = True, training: bool = True) -> None:
    tsgsv_config.validate(config, check_paths=check_paths, training=training)

  # ------------------------------------------------------------------ data
  def _tokenizer_source(self, source: str) -> str:
    world = (os.path.join(self.data_dir, "tokenizer.model")
             if self.config.data.kind == "stream_world" else "")
    return tokenizer_source(self.config, source, world)

  def _load(self, workdir: str | None, source: str = "", training: bool = True) -> None:
    c = self.config
    if c.data.kind == "stream_world":
      self.data_dir = build_stream_world(c)
    tok = self._tokenizer_source(source)
    if workdir:
      tok = pin_tokenizer(workdir, tok)
    self.tokenizer = glm.GLMTokenizer(tok, max_len=c.tokenizer.max_len)
    if c.data.kind == "stream_world":
      train_json, features = (os.path.join(self.data_dir, "train.json"),
                              os.path.join(self.data_dir, "features"))
    else:
      train_json, features = os.path.expanduser(c.data.train_json), c.data.features
    if training:
      self.queries = grounding.read_annotations(train_json, str(c.data.langs).split(","))
      self.store = grounding.FeatureStore(features)
      self.lengths = grounding.video_lengths(self.store, [q.video for q in self.queries])
      self._feature_dim = self.store.dim(self.queries[0].video)
      if workdir and jax.process_index() == 0:
        with open(os.path.join(workdir, FEATURES_FILE), "w", encoding="utf-8") as f:
          json.dump({"dim": self._feature_dim}, f)
    elif source and os.path.isfile(os.path.join(source, FEATURES_FILE)):
      with open(os.path.join(source, FEATURES_FILE), encoding="utf-8") as f:
        self._feature_dim = int(json.load(f)["dim"])
    elif not c.model.feature_dim:     # a checkpoint to evaluate: the width of its features
      feats = features if c.data.kind == "stream_world" or c.data.features else ""
      for entry in c.evals.values():
        feats = feats or (entry.get("features", "") if entry.get("source") else "")
      if not feats:
        raise ValueError("set --config.model.feature_dim (no features to read it from)")
      self._feature_dim = grounding.FeatureStore(feats).dim()

  def prepare(self, workdir: str | None = None) -> None:
    self._load(workdir)
    log.info("tsgsv: %d queries of %d videos, %d-d features", len(self.queries),
             len(self.lengths), self._feature_dim)

  def prepare_for_checkpoint(self, source: str) -> None:
    self._load(None, source, training=False)

  @property
  def feature_dim(self) -> int:
    given = int(self.config.model.feature_dim)
    if self._feature_dim and given and given != self._feature_dim:
      raise ValueError(f"model.feature_dim={given} but the features are {self._feature_dim}-d")
    if not (given or self._feature_dim):
      raise ValueError("TSGSV takes its input width from the features: set "
                       "--config.model.feature_dim to plan without data")
    return given or self._feature_dim

  @property
  def vocab_size(self) -> int:
    """The tokenizer's; before prepare() (launch/plan.py, which reads no data) model.vocab_size."""
    return shared_vocab_size(self.tokenizer, self.config.model.vocab_size, "TSGSV")

  def train_data(self, local_batch: int, block: int, blocks: int):
    c = self.config
    m = c.model
    return iter(grounding.train_dataset(
        self.queries, self.store, tokenizer=self.tokenizer, batch_size=local_batch, seed=c.seed,
        long=m.long, short=m.short, future=m.future, block=block, blocks=blocks,
        worker_count=c.data.worker_count, max_skip_fraction=c.data.max_skip_fraction,
        lengths=self.lengths))

  def batch_spec(self, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    m = self.config.model
    b, n = global_batch, m.long + m.short + m.future
    i32, f32 = jnp.int32, jnp.float32
    return {"features": jax.ShapeDtypeStruct((b, n, self.feature_dim), f32),
            "feature_mask": jax.ShapeDtypeStruct((b, n), i32),
            "labels": jax.ShapeDtypeStruct((b, m.short, 3), f32),
            "label_mask": jax.ShapeDtypeStruct((b, m.short), i32),
            "text": jax.ShapeDtypeStruct((b, self.config.tokenizer.max_len), i32),
            "text_mask": jax.ShapeDtypeStruct((b, self.config.tokenizer.max_len), i32)}

  def fake_batch(self, global_batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = super().fake_batch(global_batch, seed)
    out["feature_mask"] = np.ones_like(out["feature_mask"])
    out["label_mask"] = np.ones_like(out["label_mask"])
    out["labels"] = rng.random(out["labels"].shape).astype(np.float32)
    n = self.config.tokenizer.max_len
    mask = (np.arange(n)[None] < rng.integers(3, n + 1, (global_batch, 1))).astype(np.int32)
    out["text"] = (rng.integers(5, min(self.vocab_size, 200), (global_batch, n)) * mask
                   ).astype(np.int32)
    out["text_mask"] = mask
    return out

  # ------------------------------------------------------------------ model
  def model_config(self) -> model_lib.TSGSVConfig:
    c = self.config
    m = c.model
    return model_lib.TSGSVConfig(
        feature_dim=self.feature_dim, vocab_size=self.vocab_size, max_len=c.tokenizer.max_len,
        width=m.width, heads=m.heads, mlp_dim=m.mlp_dim, text_depth=m.text_depth,
        decoder_depth=m.decoder_depth, compress=tuple(int(n) for n in m.compress),
        long=m.long, short=m.short, future=m.future, twin=bool(m.twin), init_std=m.init_std,
        dtype=m.dtype, attention=m.attention)

  def make_model(self, rngs: nnx.Rngs) -> model_lib.TSGSVModel:
    return model_lib.TSGSVModel(self.model_config(), rngs=rngs)

  # ------------------------------------------------------------------ loss
  def loss(self, model, batch, rng):
    del rng
    c = self.config.loss
    twin = bool(self.config.model.twin)
    out = model(batch["features"], batch["feature_mask"], batch["text"], batch["text_mask"],
                twin=twin)
    focal = lambda z, y: grounding_loss.focal_bce(z, y, batch["label_mask"], gamma=c.gamma,
                                                  weights=tuple(c.channel_weights))
    main, per = focal(out["logits"], batch["labels"])
    aux = {"loss_main": main, "loss_start": per[0], "loss_end": per[1], "loss_inside": per[2]}
    if not twin:
      return main, aux
    lam = c.twin_lambda
    tw, _ = focal(out["twin_logits"], batch["labels"])
    kd, _ = focal(out["logits"], jax.lax.stop_gradient(jax.nn.sigmoid(out["twin_logits"])))
    aux.update(loss_twin=tw, loss_kd=kd)
    return (1 - lam) * main + tw + lam * kd, aux

  # ------------------------------------------------------------------ evaluation
  def predictors(self, graphdef):
    def ground(p, b):
      m = nnx.merge(graphdef, p)
      logits = m(b["features"], b["feature_mask"], b["text"], b["text_mask"])["logits"]
      return {"scores": jax.nn.sigmoid(logits)}
    return {"ground": ground}

  def eval_entries(self) -> ml_collections.ConfigDict:
    m = self.config.model
    evals = ml_collections.ConfigDict(self.config.evals.to_dict())
    for entry in evals.values():
      if "long" in entry and not entry.long:
        entry.long = m.long
      if "short" in entry and not entry.short:
        entry.short = m.short
    return evals

  def evaluators(self, only: Sequence[str] | None = None) -> dict[str, Any]:
    world = self.data_dir if self.config.data.kind == "stream_world" else ""
    return eval_build.build_all(self.eval_entries(), tokenizer=self.tokenizer, image_size=0,
                                world_dir=world, only=only, predictors=self.PREDICTORS)

  def describe(self) -> dict[str, Any]:
    m = self.config.model
    return {"width": m.width, "long": m.long, "short": m.short, "future": m.future,
            "compress": list(m.compress), "twin": bool(m.twin)}
