"""A text–video model on M²-Encoder's towers: the image tower encodes every frame (its contrastive
embedding, `image_features`), the video tower (`layers/video.py`) mixes them over time, and the
text tower gives one contrastive feature per token (its last states through the text projection),
for similarities that compare tokens with frames (DMAE's token-wise interaction).

Parameter paths: `towers/...` are an M²-Encoder's own (so an image–text run loads with
`init_from_into="towers"`), `video/...` the temporal mixer, and `text_weigher` / `frame_weigher`
TPM-CL's cross-modal weight predictors when it is on.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from bigvl.models import m2_encoder
from bigvl.models.layers.video import VideoTower, masked_mean


@dataclasses.dataclass(frozen=True)
class VideoTextConfig:
  towers: m2_encoder.M2Config
  num_frames: int = 8
  temporal: str = "transformer"       # layers/video.py TEMPORAL
  temporal_depth: int = 4
  temporal_heads: int = 4
  temporal_init_std: float = 0.02
  weight_predictors: bool = False     # TPM-CL


class VideoTextModel(nnx.Module):
  def __init__(self, cfg: VideoTextConfig, *, rngs: nnx.Rngs):
    from bigvl.systems.dmae import tpm   # the predictor is TPM-CL's
    t = cfg.towers
    self.cfg = cfg
    self.towers = m2_encoder.M2Encoder(t, rngs=rngs)
    self.video = VideoTower(t.out_dim, cfg.num_frames, temporal=cfg.temporal,
                            depth=cfg.temporal_depth, heads=cfg.temporal_heads,
                            mlp_dim=4 * t.out_dim, rngs=rngs, init_std=cfg.temporal_init_std,
                            attention=t.attention if t.attention != "cudnn" else "xla")
    if cfg.weight_predictors:
      self.text_weigher = tpm.WeightPredictor(t.out_dim, rngs=rngs)
      self.frame_weigher = tpm.WeightPredictor(t.out_dim, rngs=rngs)
    else:
      self.text_weigher = self.frame_weigher = None

  def encode_video(self, frames: jax.Array, frame_mask: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
    """frames (B, T, H, W, 3), frame_mask (B, T) → (frame features (B, T, d), clip embedding
    (B, d)), both L2-normalised float32 (a padding frame's feature is still a unit vector: masks
    keep it out of every similarity)."""
    x, _ = self.video(self.towers.image_features, frames, frame_mask)
    return m2_encoder.l2_normalize(x), m2_encoder.l2_normalize(masked_mean(x, frame_mask))

  def encode_text(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ids, mask (B, L) → (token features (B, L, d), sentence embedding (B, d): the [CLS]
    token's), L2-normalised float32."""
    x = self.towers.text_depths(ids, mask)[-1]
    z = m2_encoder.l2_normalize(self.towers.itc_vl_text_proj(x))
    return z, z[:, 0]
