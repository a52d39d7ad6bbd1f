"""DMAE + NegNCE + TPM-CL (arXiv 2309.11082) on the system protocol: text–video retrieval with
token-wise interaction, the DMAE visual and textual cues, NegNCE's hard negatives and TPM-CL's
partial samples, on M²-Encoder's towers with a video tower.

The similarity of every text with every video of the global batch is built round the ring of
batch shards (`bigvl.losses.ring_pairwise`): texts' token features travel, videos' frame features
stay, each device ends with its videos' column of the (B, B) matrix; NegNCE (or InfoNCE) is plain
jnp on that column-sharded matrix. TPM-CL's margins compare matched pairs only: per row, local.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from bigvl.data import keywords
from bigvl.data.formats import video_text
from bigvl.evaluators import build as eval_build
from bigvl.losses import negnce, ring_pairwise
from bigvl.models import video_text as vt_model
from bigvl.parallel import mesh as mesh_lib
from bigvl.systems.dmae import config as dmae_config
from bigvl.systems.dmae import similarity, tpm
from bigvl.systems.m2_encoder.system import pin_tokenizer
from bigvl.systems import videos
from bigvl.systems.on_towers import TowersSystem

log = logging.getLogger("bigvl")


def _score(x, xc, y, yc, *, visual_cue: bool, cue_scale: float) -> jax.Array:
  """Token-wise interaction of a chunk of texts with a chunk of videos (ring_pairwise's score)."""
  return similarity.token_wise_similarity(x["t"], xc["w"], xc["w"] > 0, y["v"], yc["m"],
                                          visual_cue=visual_cue, cue_scale=cue_scale)


class DMAESystem(TowersSystem):
  name = "dmae"
  PREDICTORS = ("encode_video", "encode_text", "score_tiles")
  export_subtree = "towers"

  def __init__(self, config, mesh, rules):
    super().__init__(config, mesh, rules)
    self.tagger = None
    c = config.loss
    # One object per system: a static argument of the compiled ring.
    self.score = functools.partial(_score, visual_cue=bool(c.visual_cue),
                                   cue_scale=float(c.cue_scale))

  default_config = staticmethod(dmae_config.default_config)

  @classmethod
  def validate(cls, config, *, check_paths: bool = True, training: bool = True) -> None:
    dmae_config.validate(config, check_paths=check_paths, training=training)

  # ------------------------------------------------------------------ data and tokenizer
  def _build_videos(self) -> str:
    self.data_dir = videos.build_video_world(self.config, self.image_size())
    return self.data_dir

  def _video_tokenizer(self, source: str) -> str:
    """The run's pinned copy, else init_from's (its text tower's), else tokenizer.path, else the
    video world's."""
    c = self.config
    if source and os.path.exists(os.path.join(source, "tokenizer.model")):
      return os.path.join(source, "tokenizer.model")
    if c.init_from:
      return self._tokenizer_path(c.init_from)
    if c.tokenizer.path:
      return c.tokenizer.path
    if c.data.kind == "video_world":
      return os.path.join(self.data_dir, "tokenizer.model")
    raise ValueError("set --config.tokenizer.path to a SentencePiece model")

  def prepare(self, workdir: str | None = None) -> None:
    c = self.config
    if c.init_from:
      self._adopt_backbone(c.init_from)   # the towers' sizes (and so the frame size) first
    if c.data.kind == "video_world":
      self.train_files = sorted(glob.glob(os.path.join(self._build_videos(),
                                                       "train-*.array_record")))
    else:
      self.train_files = sorted(glob.glob(c.data.train_files))
    if not self.train_files:
      raise FileNotFoundError(f"no training shards found ({c.data.kind}: "
                              f"{self.data_dir or c.data.train_files})")
    tok = self._video_tokenizer("")
    if workdir:
      tok = pin_tokenizer(workdir, tok)
    self.load_tokenizer(tok)
    self.tagger = keywords.default_tagger() if c.loss.textual_cue else None

  def prepare_for_checkpoint(self, source: str) -> None:
    c = self.config
    if c.data.kind == "video_world":
      self._build_videos()
    self.load_tokenizer(self._video_tokenizer(source))
    self.tagger = keywords.default_tagger() if c.loss.textual_cue else None

  def train_data(self, local_batch: int, block: int, blocks: int):
    c = self.config
    ds = video_text.train_dataset(
        self.train_files, tokenizer=self.tokenizer, num_frames=c.data.num_frames,
        frame_size=self.image_size(), batch_size=local_batch, seed=c.seed,
        min_frames=c.data.min_frames, drop_words=c.data.drop_words if c.loss.textual_cue else 0,
        tagger=self.tagger, block=block, blocks=blocks, worker_count=c.data.worker_count,
        max_skip_fraction=c.data.max_skip_fraction)
    return iter(ds)

  def batch_spec(self, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    s, t, n = self.image_size(), self.config.data.num_frames, self.config.tokenizer.max_len
    return {"frames": jax.ShapeDtypeStruct((global_batch, t, s, s, 3), jnp.uint8),
            "frame_mask": jax.ShapeDtypeStruct((global_batch, t), jnp.int32),
            "text": jax.ShapeDtypeStruct((global_batch, n), jnp.int32),
            "text_mask": jax.ShapeDtypeStruct((global_batch, n), jnp.int32),
            "text_weight": jax.ShapeDtypeStruct((global_batch, n), jnp.float32)}

  def fake_batch(self, global_batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random frames (every one real), right-padded ids of 3 to max_len tokens with the words'
    weights uniform."""
    rng = np.random.default_rng(seed)
    spec = self.batch_spec(global_batch)
    n = spec["text"].shape[1]
    lengths = rng.integers(3, n + 1, global_batch)
    mask = (np.arange(n)[None] < lengths[:, None]).astype(np.int32)
    words = mask.copy()
    words[:, 0] = 0
    words[np.arange(global_batch), lengths - 1] = 0
    return {"frames": rng.integers(0, 256, spec["frames"].shape).astype(np.uint8),
            "frame_mask": np.ones(spec["frame_mask"].shape, np.int32),
            "text": (rng.integers(1, 300, (global_batch, n)) * mask).astype(np.int32),
            "text_mask": mask,
            "text_weight": (words / words.sum(1, keepdims=True)).astype(np.float32)}

  # ------------------------------------------------------------------ model and loss
  def video_text_config(self, towers=None) -> vt_model.VideoTextConfig:
    c = self.config
    return vt_model.VideoTextConfig(
        towers=towers or self.model_config(), num_frames=c.data.num_frames,
        temporal=c.model.temporal, temporal_depth=c.model.temporal_depth,
        temporal_heads=c.model.temporal_heads, temporal_init_std=c.model.temporal_init_std,
        weight_predictors=c.loss.partial_type > 0)

  def make_model(self, rngs: nnx.Rngs) -> vt_model.VideoTextModel:
    return vt_model.VideoTextModel(self.video_text_config(), rngs=rngs)

  def make_eval_model(self, rngs: nnx.Rngs) -> vt_model.VideoTextModel:
    return vt_model.VideoTextModel(self.video_text_config(self.eval_model_config()), rngs=rngs)

  def similarity_matrix(self, t, tw, v, vm) -> jax.Array:
    """(B, B) text × video similarity of the global batch, sharded by columns (the ring)."""
    return ring_pairwise.pairwise_matrix(self.score, {"t": t}, {"w": tw}, {"v": v}, {"m": vm},
                                         self.mesh, batch_axes=mesh_lib.batch_axes(
                                             self.rules, self.mesh.axis_names))

  def logit_scale(self, model) -> jax.Array:
    """loss.scale, or with 0 the towers' learned temperature (CLIP's: 1/0.07 at init, at most
    100)."""
    if self.config.loss.scale:
      return jnp.float32(self.config.loss.scale)
    return jnp.minimum(jnp.exp(model.towers.logit_scale[...].astype(jnp.float32)), 100.0)

  def loss(self, model, batch, rng):
    del rng
    c = self.config.loss
    t, _ = model.encode_text(batch["text"], batch["text_mask"])
    v, _ = model.encode_video(batch["frames"], batch["frame_mask"])
    tw, vm = batch["text_weight"], batch["frame_mask"]
    s = self.similarity_matrix(t, tw, v, vm)
    scale = self.logit_scale(model)
    if c.kind == "negnce":
      loss, aux = negnce.negnce_symmetric(s, scale=scale, w_neg=c.w_neg, margin=c.margin)
    else:
      loss, aux = negnce.infonce_symmetric(s, scale=scale)
    diag = jnp.diagonal(s)
    aux = dict(aux)
    aux["acc_t2v"] = jnp.mean((diag >= jnp.max(s, axis=1)).astype(jnp.float32))
    aux["acc_v2t"] = jnp.mean((diag >= jnp.max(s, axis=0)).astype(jnp.float32))
    aux["loss_" + c.kind] = loss
    aux["logit_scale"] = scale
    if c.partial_type:
      margin, tpm_aux = tpm.tpm_margin_loss(
          t, tw, v, vm, text_weigher=model.text_weigher, frame_weigher=model.frame_weigher,
          partial_type=c.partial_type, threshold=c.tpm_threshold, margin=c.tpm_margin,
          visual_cue=False)   # the authors score partial samples without the cue
      aux.update({f"tpm/{k}": x for k, x in tpm_aux.items()})
      aux["loss_tpm"] = margin
      weight = c.tpm_weight
      if c.tpm_relative:
        # NegNCE's gradient grows with the scale, the margins' does not: keep the authors' ratio
        # (scale 100, weight 1) under a learned scale (~15 from nothing, where weight 1 lets the
        # margins win and retrieval fails to learn: README, DMAE).
        weight = weight * jax.lax.stop_gradient(scale) / 100.0
      aux["tpm/weight"] = jnp.asarray(weight, jnp.float32)
      loss = loss + weight * margin
    return loss, aux

  # ------------------------------------------------------------------ evaluation and reports
  def predictors(self, graphdef):
    score = self.score

    def encode_video(p, b):
      v, _ = nnx.merge(graphdef, p).encode_video(b["frames"], b["frame_mask"])
      return {"tokens": v, "frame_mask": b["frame_mask"]}

    def encode_text(p, b):
      return {"tokens": nnx.merge(graphdef, p).encode_text(b["text"], b["text_mask"])[0]}

    def score_tiles(p, b):
      del p
      one = lambda t, tw, v, vm: score({"t": t}, {"w": tw}, {"v": v}, {"m": vm})
      return {"sim": jax.vmap(one)(b["t"], b["tw"], b["v"], b["vm"])}

    return {"encode_video": encode_video, "encode_text": encode_text,
            "score_tiles": score_tiles}

  def eval_entries(self) -> ml_collections.ConfigDict:
    """config.evals with a video_retrieval entry's "system's" keys filled: frames per video, and
    the text weights training uses."""
    evals = ml_collections.ConfigDict(self.config.evals.to_dict())
    weights = "keywords" if self.config.loss.textual_cue else "uniform"
    for entry in evals.values():
      if "num_frames" in entry and not entry.num_frames:
        entry.num_frames = self.config.data.num_frames
      if "text_weights" in entry and not entry.text_weights:
        entry.text_weights = weights
    return evals

  def evaluators(self, only: Sequence[str] | None = None) -> dict[str, Any]:
    world = self.data_dir if self.config.data.kind == "video_world" else ""
    return eval_build.build_all(self.eval_entries(), tokenizer=self.tokenizer,
                                image_size=self.image_size(), world_dir=world, only=only,
                                predictors=self.PREDICTORS)

  def describe(self) -> dict[str, Any]:
    c = self.config
    return {"variant": c.model.variant, "temporal": c.model.temporal,
            "frames": c.data.num_frames, "frame_size": self.image_size(), "loss": c.loss.kind,
            "visual_cue": bool(c.loss.visual_cue), "textual_cue": bool(c.loss.textual_cue),
            "partial_type": c.loss.partial_type, "text_len": c.tokenizer.max_len}
