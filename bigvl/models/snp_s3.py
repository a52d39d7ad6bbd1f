"""SNP-S3's model (arXiv 2401.17773): a video backbone and ONE shared BERT-type encoder that reads
the text alone and, reusing the same embeddings and layers, the text with visual tokens.

  video      the shared video tower (`layers/video.py`) over a small ViT per frame (its CLS
             feature), frames mixed over time; the T frame features mean-pooled into
             `clip_groups` visual tokens (consecutive frame groups: T/groups frames each) and
             projected to the BERT's width (`visual_proj`); with `patch_grid` g, each group's
             patch tokens too, pooled to g×g (`visual_tokens`).
  bert       word + position + token-type embeddings (type 0 text, 1 visual; LayerNorm after the
             sum, as BERT), pre-LN bidirectional blocks (`layers/block.py`), a final norm.
             text-only:    [CLS] w₁ … wₙ [EOS]                       (types 0)
             cross-modal:  [CLS] w₁ … wₙ [EOS] v₁ … v_C [SEP]         (types 0 …, then 1)
             The visual tokens and the closing [SEP] (the tokenizer's EOS) take the positions
             after the text's padded length, so a text's positions are the same in both.
  heads      mlm (BERT's transform + LayerNorm, decoder tied to the word embedding, own bias),
             text_proj / video_proj (the contrastive space, L2-normalised), itm (2 classes on the
             cross-modal [CLS]), qa_choice (one score per cross-modal [CLS]: multiple choice),
             qa_open (answer vocabulary logits) when `open_answers` > 0.

Everything is one parameter tree, so the momentum encoder of the MoCo loss is one copy of it
(`bigvl.systems.snp_s3`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from bigvl.models.layers.attention import Attention
from bigvl.models.layers.block import Block
from bigvl.models.layers.factories import Linears
from bigvl.models.layers.init import param, partitioned, trunc_normal
from bigvl.models.layers.mlp import ACTIVATIONS, MLP
from bigvl.models.layers.stack import run_layers
from bigvl.models.layers.video import VideoTower
from bigvl.models.layers.vit import ViT
from bigvl.parallel.sharding import constrain


@dataclasses.dataclass(frozen=True)
class SNPS3Config:
  vocab_size: int
  max_len: int = 32                 # text tokens (padded length)
  width: int = 128                  # the BERT's
  depth: int = 4
  heads: int = 4
  mlp_dim: int = 512
  embed_dim: int = 128              # the contrastive space
  frame_size: int = 32
  patch_size: int = 8
  vit_width: int = 128
  vit_depth: int = 2
  vit_heads: int = 4
  num_frames: int = 8
  temporal: str = "transformer"     # layers/video.py TEMPORAL
  temporal_depth: int = 1
  clip_groups: int = 4              # visual tokens per video
  patch_grid: int = 0               # > 0: also each group's patch tokens, pooled to a g×g grid
  open_answers: int = 0             # qa_open's classes (0: no head)
  init_std: float = 0.02
  dtype: str = "float32"
  attention: str = "xla"

  def __post_init__(self):
    if self.num_frames % self.clip_groups:
      raise ValueError(f"num_frames={self.num_frames} must be a multiple of clip_groups="
                       f"{self.clip_groups}")
    side = self.frame_size // self.patch_size
    if self.patch_grid and side % self.patch_grid:
      raise ValueError(f"patch_grid={self.patch_grid} does not divide the {side}x{side} patches")

  @property
  def num_visual(self) -> int:
    """Visual tokens per video: the groups' features, then their pooled patches."""
    return self.clip_groups * (1 + self.patch_grid ** 2)


def l2_normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


class SharedBert(nnx.Module):
  """The one encoder of text-only and cross-modal inputs (see the module docstring)."""

  def __init__(self, cfg: SNPS3Config, make: Linears, rngs: nnx.Rngs):
    w, std = cfg.width, cfg.init_std
    dt = jnp.dtype(cfg.dtype)
    self.word_embed = nnx.Embed(cfg.vocab_size, w, dtype=dt,
                                embedding_init=partitioned(trunc_normal(std), ("vocab", "embed")),
                                rngs=rngs)
    positions = cfg.max_len + cfg.num_visual + 1
    self.pos_embed = param(trunc_normal(std)(rngs.params(), (positions, w)), ("position", "embed"))
    self.type_embed = param(trunc_normal(std)(rngs.params(), (2, w)), (None, "embed"))
    self.embed_norm = make.norm(w)

    def attn(mode: str) -> Attention:
      return Attention(w, num_heads=cfg.heads, mode=mode, linear=make.linear,
                       impl=cfg.attention)

    self.blocks = nnx.List([
        Block(w, attention=attn, mlp=lambda: MLP(w, cfg.mlp_dim, linear=make.linear),
              norm=make.norm) for _ in range(cfg.depth)])
    self.norm = make.norm(w)
    self.max_len, self.dtype = cfg.max_len, dt

  def __call__(self, ids: jax.Array, mask: jax.Array, visual: jax.Array | None = None,
               visual_mask: jax.Array | None = None, sep_id: int | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """ids, mask (B, L); visual (B, C, width) and its mask (B, C), or None → (states
    (B, L[+C+1], width) float32, the key mask used)."""
    b, n = ids.shape
    if n > self.max_len:
      raise ValueError(f"{n} text tokens > the encoder's {self.max_len} positions")
    pos, types = self.pos_embed[...], self.type_embed[...]
    x = self.word_embed(ids) + pos[None, :n] + types[0][None, None]
    key_mask = mask.astype(bool)
    if visual is not None:
      c = visual.shape[1]
      v = visual.astype(x.dtype) + pos[None, self.max_len:self.max_len + c] + types[1]
      sep = (self.word_embed(jnp.full((b, 1), sep_id, jnp.int32))
             + pos[None, self.max_len + c:self.max_len + c + 1] + types[1])
      x = jnp.concatenate([x, v, sep], axis=1)
      vm = jnp.ones((b, c), bool) if visual_mask is None else visual_mask.astype(bool)
      key_mask = jnp.concatenate([key_mask, vm, jnp.ones((b, 1), bool)], axis=1)
    x = constrain(self.embed_norm(x.astype(self.dtype)), ("batch", "length", "embed"))
    x = run_layers(self.blocks, x, lambda block, h, m: block(h, key_mask=m), key_mask)
    return self.norm(x).astype(jnp.float32), key_mask


class MLMHead(nnx.Module):
  """BERT's: dense → GELU → LayerNorm → the word embedding's transpose + a bias."""

  def __init__(self, cfg: SNPS3Config, make: Linears):
    self.dense = make.linear(cfg.width, cfg.width, ("embed", "mlp"))
    self.norm = make.norm(cfg.width)
    self.bias = param(jnp.zeros((cfg.vocab_size,)), ("vocab",))

  def __call__(self, x: jax.Array, embedding: jax.Array) -> jax.Array:
    h = self.norm(ACTIVATIONS["gelu"](self.dense(x)))
    return (jnp.einsum("...d,vd->...v", h.astype(jnp.float32), embedding.astype(jnp.float32))
            + self.bias[...])


class SNPS3Model(nnx.Module):
  def __init__(self, cfg: SNPS3Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dt = jnp.dtype(cfg.dtype)
    make = Linears(rngs, dtype=dt, kernel_init=lambda gain: trunc_normal(cfg.init_std, gain))
    self.frames = ViT(width=cfg.vit_width, depth=cfg.vit_depth, heads=cfg.vit_heads,
                      mlp_dim=4 * cfg.vit_width, patch_size=cfg.patch_size,
                      image_size=cfg.frame_size, rngs=rngs, dtype=dt, init_std=cfg.init_std,
                      attention=cfg.attention)
    self.video = VideoTower(cfg.vit_width, cfg.num_frames, temporal=cfg.temporal,
                            depth=cfg.temporal_depth, heads=cfg.vit_heads, rngs=rngs,
                            init_std=cfg.init_std, attention=cfg.attention, dtype=dt)
    self.visual_proj = make.linear(cfg.vit_width, cfg.width, ("mlp", "embed"))
    self.bert = SharedBert(cfg, make, rngs)
    self.mlm = MLMHead(cfg, make)
    self.text_proj = make.linear(cfg.width, cfg.embed_dim, ("embed", "mlp"))
    self.video_proj = make.linear(cfg.width, cfg.embed_dim, ("embed", "mlp"))
    self.itm = make.linear(cfg.width, 2, ("embed", None))
    self.qa_choice = make.linear(cfg.width, 1, ("embed", None))
    self.qa_open = (make.linear(cfg.width, cfg.open_answers, ("embed", None))
                    if cfg.open_answers else None)

  # ------------------------------------------------------------------ towers
  def visual_tokens(self, frames: jax.Array, frame_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """frames (B, T, H, W, 3), frame_mask (B, T) → (visual tokens (B, num_visual, width), their
    mask: a group with no real frame is masked, with its patches).

    The first C tokens are the groups' mixed frame features (mean over the group's real frames);
    with `patch_grid` g > 0, C·g² more follow: each group's ViT patch tokens, averaged over its
    real frames and pooled to a g×g grid (group-major, then row, then column)."""
    cfg = self.cfg
    b, t = frames.shape[:2]
    cls, patches = self.frames(frames.reshape((b * t,) + frames.shape[2:]))
    x, _ = self.video.mix(cls.reshape(b, t, -1), frame_mask)
    d = x.shape[-1]
    c = cfg.clip_groups
    m = frame_mask.astype(jnp.float32).reshape(b, c, t // c, 1)
    count = jnp.maximum(jnp.sum(m, axis=2), 1.0)                       # (B, C, 1)
    tokens = jnp.sum(x.reshape(b, c, t // c, d) * m, axis=2) / count
    mask = jnp.sum(m, axis=(2, 3)) > 0
    if g := cfg.patch_grid:
      side = cfg.frame_size // cfg.patch_size
      r = side // g
      p = patches.astype(jnp.float32).reshape(b, c, t // c, side * side, d)
      p = jnp.sum(p * m[..., None], axis=2) / count[..., None]          # (B, C, P, d)
      p = p.reshape(b, c, g, r, g, r, d).mean(axis=(3, 5)).reshape(b, c * g * g, d)
      tokens = jnp.concatenate([tokens, p], axis=1)
      mask = jnp.concatenate([mask, jnp.repeat(mask, g * g, axis=1)], axis=1)
    return self.visual_proj(tokens.astype(self.bert.dtype)).astype(jnp.float32), mask

  def encode_text(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Text alone → (states (B, L, width), sentence embedding (B, embed_dim): [CLS], normalised)."""
    h, _ = self.bert(ids, mask)
    return h, l2_normalize(self.text_proj(h[:, 0]))

  def embed_video(self, visual: jax.Array, visual_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Visual tokens → (clip features (B, C, embed_dim), video embedding (B, embed_dim)), both
    normalised; the video's is the projected mean of its real groups. Only the C group tokens
    take part (patch tokens are for the cross-modal encoder)."""
    c = self.cfg.clip_groups
    visual, visual_mask = visual[:, :c], visual_mask[:, :c]
    m = visual_mask.astype(jnp.float32)[..., None]
    pooled = jnp.sum(visual * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    return l2_normalize(self.video_proj(visual)), l2_normalize(self.video_proj(pooled))

  def word_features(self, states: jax.Array) -> jax.Array:
    """Token states of the text encoder → word features in the contrastive space (LVWM)."""
    return l2_normalize(self.text_proj(states))

  def cross(self, ids: jax.Array, mask: jax.Array, visual: jax.Array, visual_mask: jax.Array,
            sep_id: int) -> jax.Array:
    """[text; visual; SEP] through the same encoder → states (B, L + C + 1, width)."""
    return self.bert(ids, mask, visual, visual_mask, sep_id)[0]

  def mlm_logits(self, states: jax.Array) -> jax.Array:
    return self.mlm(states, self.bert.word_embed.embedding[...])
