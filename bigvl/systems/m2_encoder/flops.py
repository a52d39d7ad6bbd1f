"""M²-Encoder's model FLOPs per training example (bigvl.train.flops has the convention)."""

from __future__ import annotations

from bigvl.models.m2_encoder import M2Config
from bigvl.train.flops import layer_flops


def forward_flops(cfg: M2Config, text_len: int, contrastive_batch: int) -> dict[str, int]:
  """Forward FLOPs per image-text pair of an M²-Encoder training example, by part.

  The vision tower runs the patches plus CLS, the text tower the padded text length (padding is
  computed, then masked), both through `depth` Multiway and `vl_depth` shared layers. The loss
  multiplies each embedding with the `contrastive_batch` embeddings of its group, once for both
  directions (the ring loss computes each block once).
  """
  d, layers = cfg.width, cfg.depth + cfg.vl_depth
  vision_tokens = cfg.num_patches + 1
  return {
      "patch_embed": 2 * cfg.num_patches * (cfg.patch_size ** 2 * 3) * d,
      "vision_layers": layers * layer_flops(vision_tokens, d, cfg.mlp_dim),
      "text_layers": layers * layer_flops(text_len, d, cfg.mlp_dim),
      "heads": 2 * 2 * d * cfg.out_dim,
      "contrastive": 2 * contrastive_batch * cfg.out_dim,
  }


def train_flops(cfg: M2Config, text_len: int, contrastive_batch: int) -> int:
  """Model FLOPs of one training example: 3 × forward (the backward is two products per product)."""
  return 3 * sum(forward_flops(cfg, text_len, contrastive_batch).values())
