"""M²-Encoder contrastive pretraining on the system protocol: two towers, symmetric InfoNCE over
the global batch (the sharded ring loss), GradCache for batches larger than memory."""

from __future__ import annotations

import dataclasses
import filecmp
import glob
import logging
import os
import shutil
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from bigvl import losses
from bigvl.data.formats import image_text
from bigvl.evaluators import build as eval_build
from bigvl.models import m2_encoder
from bigvl.parallel import mesh as mesh_lib
from bigvl.systems import base
from bigvl.systems.m2_encoder import config as m2_config
from bigvl.systems.m2_encoder import flops as m2_flops
from bigvl.tokenizers import glm

log = logging.getLogger("bigvl")


def tokenizer_source(config: ml_collections.ConfigDict, source: str, world_tokenizer: str) -> str:
  """The tokenizer file a run reads: the one pinned in `source` (a checkpoint being read) or in
  `init_from`, else `tokenizer.path`, else the embedded world's (`world_tokenizer`; "" when the
  run reads no world)."""
  for d in (source, config.init_from):
    if d and os.path.exists(os.path.join(d, "tokenizer.model")):
      return os.path.join(d, "tokenizer.model")
  if config.tokenizer.path:
    return config.tokenizer.path
  if world_tokenizer:
    return world_tokenizer
  raise ValueError("set --config.tokenizer.path to a SentencePiece model")


def vocab_size(tokenizer, given: int, who: str) -> int:
  """A model's vocabulary: the tokenizer's (`given`, the config's model.vocab_size, must agree
  when set); before a tokenizer is read (launch/plan.py, which reads no data) `given`."""
  given = int(given)
  if tokenizer is None:
    if not given:
      raise ValueError(f"{who} takes its vocabulary from the tokenizer: set "
                       "--config.model.vocab_size to plan without data")
    return given
  size = int(tokenizer.sp.get_piece_size())
  if given and given != size:
    raise ValueError(f"model.vocab_size={given} but the tokenizer has {size} pieces")
  return size


def pin_tokenizer(workdir: str, source: str) -> str:
  """The run's own copy of its tokenizer: copied into `workdir` on the first run and read from
  there afterwards, so a rebuilt world (or an edited tokenizer file) can never change the token ids
  under a resumed or exported checkpoint. Returns the pinned path."""
  pinned = os.path.join(workdir, "tokenizer.model")
  if jax.process_index() == 0:
    if not os.path.exists(pinned):
      shutil.copyfile(source, pinned + ".tmp")
      os.replace(pinned + ".tmp", pinned)
    elif not filecmp.cmp(pinned, source, shallow=False):
      log.warning("%s differs from the run's tokenizer %s: using the run's", source, pinned)
  if jax.process_count() > 1:
    # Every process waits, also one that finds the file: process 0 may just have written it.
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("bigvl_tokenizer_pinned")
  return pinned


class M2EncoderSystem(base.System):
  name = "m2_encoder"

  def __init__(self, config: ml_collections.ConfigDict, mesh, rules: Sequence[tuple]):
    super().__init__(config, mesh, rules)
    self.tokenizer: glm.GLMTokenizer | None = None
    self.data_dir = ""
    self.train_files: list[str] = []
    # Sizes an imported parameter directory records (its config.json): they win over the config's,
    # so a checkpoint is evaluated as the model it is (prepare_for_checkpoint).
    self.checkpoint_sizes: dict[str, Any] = {}
    self.checkpoint_max_len: int | None = None
    self.batch_axes = mesh_lib.batch_axes(self.rules)

  default_config = staticmethod(m2_config.default_config)

  @classmethod
  def validate(cls, config, *, check_paths: bool = True, training: bool = True) -> None:
    m2_config.validate(config, check_paths=check_paths, training=training)

  # ------------------------------------------------------------------ data and tokenizer
  def image_size(self) -> int:
    c = self.config.model
    return (self.checkpoint_sizes.get("image_size") or c.image_size
            or m2_encoder.VARIANTS[c.variant]["image_size"])

  def _build_world(self) -> str:
    """The embedded world's directory, built once (by process 0; the others wait)."""
    from data_pipelines import build_world
    c = self.config
    self.data_dir = c.data.dir or str(build_world.default_dir(self.image_size()))
    if jax.process_index() == 0:
      w = c.data.world
      build_world.build(self.data_dir, seed=w.seed, image_size=self.image_size(),
                        num_train=w.num_train, num_eval=w.num_eval, num_shards=w.num_shards,
                        vocab_size=w.vocab_size)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("bigvl_data_built")
    return self.data_dir

  def prepare(self, workdir: str | None = None) -> None:
    """Makes sure the data and the tokenizer exist (building the embedded world once); with
    `workdir`, the run's tokenizer is pinned there (`pin_tokenizer`)."""
    c = self.config
    if c.data.kind == "synthetic_world":
      self.train_files = sorted(glob.glob(os.path.join(self._build_world(),
                                                       "train-*.array_record")))
      tok_path = c.tokenizer.path or os.path.join(self.data_dir, "tokenizer.model")
    else:
      self.train_files = sorted(glob.glob(c.data.train_files))
      tok_path = c.tokenizer.path
    if not self.train_files:
      raise FileNotFoundError(f"no training shards found ({c.data.kind}: "
                              f"{self.data_dir or c.data.train_files})")
    if workdir:
      tok_path = pin_tokenizer(workdir, tok_path)
    self.load_tokenizer(tok_path)

  def prepare_for_checkpoint(self, source: str) -> None:
    """The tokenizer of the checkpoint at `source` (no training shards needed): a run's pinned
    copy, else the one an imported parameter directory carries, else `tokenizer.path`, else the
    embedded world's. The world is built when the config trains on it (its evals read it). An
    imported directory is evaluated as the model its config.json records (sizes and max_len),
    whatever --config sized."""
    from bigvl.export import params_io
    c = self.config
    if c.data.kind == "synthetic_world":
      self._build_world()
    params_dir = bool(source) and params_io.is_params_dir(source)
    if params_dir:
      doc = params_io.read_config(source)
      sizes = {k: v for k, v in doc["model"].items() if k != "vocab_size"}  # vocab: its tokenizer
      changed = {k: (c.model.get(k), v) for k, v in sizes.items() if c.model.get(k) not in (None, v)}
      if changed:
        log.info("%s: evaluating the model it records, not the config's sizes (config, "
                 "recorded): %s", source, changed)
      self.checkpoint_sizes = sizes
      self.checkpoint_max_len = doc.get("tokenizer", {}).get("max_len")
    pinned = os.path.join(source, "tokenizer.model") if source else ""
    if pinned and os.path.exists(pinned):
      path = pinned
    elif params_dir and not c.tokenizer.path:
      path = os.path.join(source, doc["tokenizer"]["file"])
    elif c.tokenizer.path:
      path = c.tokenizer.path
    elif c.data.kind == "synthetic_world":
      path = os.path.join(self.data_dir, "tokenizer.model")
    else:
      raise ValueError("set --config.tokenizer.path to the checkpoint's SentencePiece model")
    self.load_tokenizer(path)

  def load_tokenizer(self, path: str) -> None:
    c = self.config.tokenizer
    self.tokenizer = glm.GLMTokenizer(path, max_len=self.checkpoint_max_len or c.max_len,
                                      lowercase=c.lowercase)

  def train_data(self, local_batch: int, block: int, blocks: int):
    ds = image_text.train_dataset(
        self.train_files, tokenizer=self.tokenizer, image_size=self.image_size(),
        batch_size=local_batch, seed=self.config.seed, block=block, blocks=blocks,
        worker_count=self.config.data.worker_count,
        max_skip_fraction=self.config.data.max_skip_fraction,
        max_open_shards=self.config.data.max_open_shards)
    return iter(ds)

  def batch_spec(self, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    s, n = self.image_size(), self.config.tokenizer.max_len
    return {"image": jax.ShapeDtypeStruct((global_batch, s, s, 3), jnp.uint8),   # normalised on device
            "text": jax.ShapeDtypeStruct((global_batch, n), jnp.int32),
            "text_mask": jax.ShapeDtypeStruct((global_batch, n), jnp.int32)}

  def fake_batch(self, global_batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """uint8 images and right-padded token ids of 2 to max_len tokens."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, spec in self.batch_spec(global_batch).items():
      if name == "image":
        x = rng.integers(0, 256, spec.shape)
      elif name == "text_mask":
        lengths = rng.integers(2, spec.shape[1] + 1, spec.shape[0])
        x = np.arange(spec.shape[1])[None] < lengths[:, None]
      else:
        x = rng.integers(1, 300, spec.shape)
      out[name] = x.astype(spec.dtype)
    return out

  # ------------------------------------------------------------------ model and loss
  def model_config(self) -> m2_encoder.M2Config:
    c = self.config.model
    fields = {f.name for f in dataclasses.fields(m2_encoder.M2Config)}
    # Keys of a system built on these towers (its decoders' sizes) are not the towers'.
    overrides = {k: v for k, v in c.items() if k in fields and v is not None}
    overrides.update(self.checkpoint_sizes)
    overrides["dtype"] = jnp.dtype(overrides.get("dtype", "float32"))
    # Without prepare() (shape planning, launch/plan.py) the variant's own vocabulary stands in.
    vocab = (self.tokenizer.vocab_size if self.tokenizer is not None
             else m2_encoder.VARIANTS[c.variant]["vocab_size"])
    return m2_encoder.config_for(c.variant, vocab_size=vocab, **overrides)

  def make_model(self, rngs: nnx.Rngs) -> m2_encoder.M2Encoder:
    return m2_encoder.M2Encoder(self.model_config(), rngs=rngs)

  def make_eval_model(self, rngs: nnx.Rngs) -> m2_encoder.M2Encoder:
    """The model as evaluation runs it: computing in `model.eval_dtype` (default float32), the
    same parameters."""
    return m2_encoder.M2Encoder(self.eval_model_config(), rngs=rngs)

  def eval_model_config(self) -> m2_encoder.M2Config:
    cfg = self.model_config()
    dtype = self.config.model.get("eval_dtype") or ""
    if dtype:
      changes = {"dtype": jnp.dtype(dtype)}
      if cfg.attention == "cudnn" and changes["dtype"] == jnp.float32:
        changes["attention"] = "xla"   # cuDNN's fused attention is half precision only
      cfg = dataclasses.replace(cfg, **changes)
    return cfg

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

  def loss(self, model, batch, rng):
    del rng  # deterministic: GradCache runs each micro-batch's forward pass twice
    return self.embedding_loss(model, self.embed(model, batch))

  def value_and_grad(self, graphdef, params, frozen, batch, rng):
    """GradCache: with loss.accum_steps K the contrastive batch is the whole global batch while
    only one micro-batch's activations are alive at a time (K=1 is a plain value_and_grad)."""
    del rng
    model = lambda p: nnx.merge(graphdef, p, frozen)
    return losses.accumulated_value_and_grad(
        lambda p, mb: self.embed(model(p), mb), lambda p, emb: self.embedding_loss(model(p), emb),
        params, batch, self.accum_steps,
        num_shards=mesh_lib.data_parallel_size(self.mesh, self.rules))

  def post_update(self, params, extra, step):
    # CLIP's clamp: a temperature above 100 makes the softmax too sharp to train.
    params = dict(params)
    params["logit_scale"] = jnp.minimum(params["logit_scale"], self.config.loss.logit_scale_max)
    return params, extra

  # ------------------------------------------------------------------ evaluation and reports
  def predictors(self, graphdef) -> dict[str, Callable[[Any, dict], dict]]:
    return {
        "embed_image": lambda p, b: {
            "embedding": nnx.merge(graphdef, p).encode_image(b["image"])},
        "embed_text": lambda p, b: {
            "embedding": nnx.merge(graphdef, p).encode_text(b["text"], b["text_mask"])},
    }

  def evaluators(self, only: Sequence[str] | None = None) -> dict[str, Any]:
    """The config's evals that are on (or those named in `only`): bigvl/evaluators/build.py."""
    world_dir = self.data_dir if self.config.data.kind == "synthetic_world" else ""
    return eval_build.build_all(self.config.evals, tokenizer=self.tokenizer,
                                image_size=self.image_size(), world_dir=world_dir, only=only,
                                predictors=("embed_image", "embed_text"))

  def contrastive_batch(self) -> int:
    """Embeddings each one is compared with: the global batch over the number of loss groups."""
    dp = mesh_lib.data_parallel_size(self.mesh, self.rules)
    return self.config.batch_size * (self.config.loss.group_size or dp) // dp

  def forward_flops_by_part(self) -> dict[str, int]:
    return m2_flops.forward_flops(self.model_config(), self.config.tokenizer.max_len,
                                  self.contrastive_batch())

  def flops_per_example(self) -> float:
    return m2_flops.train_flops(self.model_config(), self.config.tokenizer.max_len,
                                self.contrastive_batch())

  def describe(self) -> dict[str, Any]:
    cfg = self.model_config()
    return {"variant": self.config.model.variant, "dtype": str(cfg.dtype),
            "param_dtype": str(cfg.param_dtype), "scan_layers": cfg.scan_layers,
            "remat": cfg.remat, "remat_policy": cfg.remat_policy, "attention": cfg.attention,
            "text_len": self.config.tokenizer.max_len}
