"""M²-Encoder contrastive pretraining: two towers, symmetric InfoNCE over the global batch."""

from __future__ import annotations

import filecmp
import glob
import logging
import os
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from bigvl.data import pipeline
from bigvl.evaluators import build, common
from bigvl.parallel import sharding
from bigvl import losses
from bigvl.models import m2_encoder
from bigvl.tokenizers import glm

log = logging.getLogger("bigvl")


class ContrastiveSystem:

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.tokenizer: glm.GLMTokenizer | None = None
    self.data_dir = ""

  # ------------------------------------------------------------------ data and tokenizer
  def image_size(self) -> int:
    c = self.config.model
    return c.image_size or m2_encoder.VARIANTS[c.variant]["image_size"]

  def prepare(self, workdir: str | None = None) -> None:
    """Makes sure the data and the tokenizer exist (building the embedded world once).

    With `workdir`, the run's tokenizer is pinned: copied there on the first run and read from
    there afterwards, so a rebuilt world (or an edited tokenizer file) can never change the token
    ids under a resumed or exported checkpoint.
    """
    c = self.config
    if c.data.kind == "synthetic_world":
      from data_pipelines import build_world
      self.data_dir = c.data.dir or build_world.default_dir(self.image_size())
      if jax.process_index() == 0:
        w = c.data.world
        build_world.build(self.data_dir, seed=w.seed, image_size=self.image_size(),
                          num_train=w.num_train, num_eval=w.num_eval, num_shards=w.num_shards,
                          vocab_size=w.vocab_size)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("bigvl_data_built")
      self.train_files = sorted(glob.glob(os.path.join(self.data_dir, "train-*.array_record")))
      tok_path = c.tokenizer.path or os.path.join(self.data_dir, "tokenizer.model")
    else:
      self.train_files = sorted(glob.glob(c.data.train_files))
      tok_path = c.tokenizer.path
    if not self.train_files:
      raise FileNotFoundError(f"no training shards found ({c.data.kind}: "
                              f"{self.data_dir or c.data.train_files})")
    if workdir:
      pinned = os.path.join(workdir, "tokenizer.model")
      if jax.process_index() == 0:
        if not os.path.exists(pinned):
          shutil.copyfile(tok_path, pinned + ".tmp")
          os.replace(pinned + ".tmp", pinned)
        elif not filecmp.cmp(pinned, tok_path, shallow=False):
          log.warning("%s differs from the run's tokenizer %s: using the run's", tok_path, pinned)
      if jax.process_count() > 1:
        # Every process waits, also one that finds the file: process 0 may just have written it.
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("bigvl_tokenizer_pinned")
      tok_path = pinned
    self.tokenizer = glm.GLMTokenizer(tok_path, max_len=c.tokenizer.max_len,
                                      lowercase=c.tokenizer.lowercase)

  def train_iterator(self, batch_size: int, process_index: int, process_count: int):
    ds = pipeline.train_dataset(
        self.train_files, tokenizer=self.tokenizer, image_size=self.image_size(),
        batch_size=batch_size, seed=self.config.seed, process_index=process_index,
        process_count=process_count, worker_count=self.config.data.worker_count,
        max_skip_fraction=self.config.data.max_skip_fraction)
    return iter(ds)

  # ------------------------------------------------------------------ model and loss
  def model_config(self) -> m2_encoder.M2Config:
    c = self.config.model
    overrides = {k: v for k, v in c.items() if k != "variant" and v is not None}
    overrides["dtype"] = jnp.dtype(overrides.get("dtype", "float32"))
    # Without prepare() (shape planning, launch/plan.py) the variant's own vocabulary stands in.
    vocab = (self.tokenizer.vocab_size if self.tokenizer is not None
             else m2_encoder.VARIANTS[c.variant]["vocab_size"])
    return m2_encoder.config_for(c.variant, vocab_size=vocab, **overrides)

  def make_model(self, rngs: nnx.Rngs) -> m2_encoder.M2Encoder:
    return m2_encoder.M2Encoder(self.model_config(), rngs=rngs)

  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The global training batch as shapes (what train_iterator yields, less "id")."""
    s, n = self.image_size(), self.config.tokenizer.max_len
    return {"image": jax.ShapeDtypeStruct((batch_size, s, s, 3), jnp.float32),
            "text": jax.ShapeDtypeStruct((batch_size, n), jnp.int32),
            "text_mask": jax.ShapeDtypeStruct((batch_size, n), jnp.int32)}

  def set_mesh(self, mesh: Mesh, rules) -> None:
    spec = sharding.logical_to_spec(("batch",), rules)[0]
    self.mesh, self.batch_axes = mesh, (() if spec is None else spec)

  def embed(self, model: m2_encoder.M2Encoder, batch: dict[str, jax.Array]):
    return model(batch["image"], batch["text"], batch["text_mask"])

  def embedding_loss(self, model: m2_encoder.M2Encoder, emb):
    """The grouped ring InfoNCE (exact global InfoNCE when loss.group_size is 0 = all devices)."""
    zimg, ztxt = emb
    scale = model.logit_scale[...]
    if self.config.loss.impl == "dense":   # the exact oracle: XLA gathers the whole batch
      loss, aux = losses.dense_contrastive_loss(zimg, ztxt, scale)
    else:
      loss, aux = losses.contrastive_loss(zimg, ztxt, scale, self.mesh, batch_axes=self.batch_axes,
                                          group_size=self.config.loss.group_size or None)
    aux["logit_scale"] = jnp.exp(scale)
    return loss, aux

  def loss(self, model: m2_encoder.M2Encoder, batch: dict[str, jax.Array]):
    return self.embedding_loss(model, self.embed(model, batch))

  def post_update(self, params: dict[str, Any]) -> dict[str, Any]:
    # CLIP's clamp: a temperature above 100 makes the softmax too sharp to train.
    params = dict(params)
    params["logit_scale"] = jnp.minimum(params["logit_scale"], self.config.loss.logit_scale_max)
    return params

  # ------------------------------------------------------------------ evaluation
  def encoder(self, graphdef, mesh: Mesh) -> Callable[[Any], common.Encoder]:
    """params → an encoder whose batches are split over every device of `mesh` (all processes)."""
    towers = {
        "image": lambda p, b: nnx.merge(graphdef, p).encode_image(b["image"]),
        "text": lambda p, b: nnx.merge(graphdef, p).encode_text(b["text"], b["text_mask"]),
    }
    sizes = [ev.batch_size for ev in self.config.evals.values()] or [256]
    return common.sharded_encoder(towers, mesh, batch_size=max(sizes))

  def evaluators(self, only: list[str] | None = None) -> dict[str, Any]:
    """The config's evals that are on (or those named in `only`): bigvl/evaluators/build.py."""
    world_dir = self.data_dir if self.config.data.kind == "synthetic_world" else ""
    return build.build_all(self.config.evals, tokenizer=self.tokenizer,
                           image_size=self.image_size(), world_dir=world_dir, only=only)
