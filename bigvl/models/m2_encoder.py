"""M²-Encoder: a BEiT-3 style Multiway encoder used as a two-tower image-text model.

Facts and key names: `docs/m2_encoder.md`. Attribute paths mirror the released PyTorch keys:

  backbone.text_embed                      text tokens → width
  backbone.vision_embed.{proj, cls_token}  Conv patch embedding (kernel = stride = patch) and CLS
  backbone.encoder.embed_positions.{A,B}   learned positions, ids from 2 (A: vision, B: text)
  backbone.encoder.layers[i]               Multiway layers: images use all-A weights, text all-B
  backbone.encoder.layer_norm.{A,B}
  backbone_vl.layers[j], .layer_norm.A     shared top layers: both modalities use A
  itc_vl_{image,text}_proj.fc              bias-free projections of the top-stack CLS
  logit_scale

Weights that exist in released checkpoints but are never used at inference are not created: the B
branch of `backbone_vl`, the bottom-CLS heads `itc_{image,text}_proj`, `logit_vl_scale` and
`vision_embed.mask_token`. `checkpoint_param_count` adds them back to compare with released sizes.

Parameter counts (vocab 115,244, image 224, 1024 text positions), bigvl / in the checkpoint:
  0.4B:   240,228,865 /    262,697,474  (≈ 0.26 B)
  1B:     689,444,865 /    729,364,482  (≈ 0.73 B)
  10B:  9,552,551,937 / 10,165,215,234  (≈ 10.2 B)

Patch embedding: `nnx.Conv` on NHWC images, kernel (kh, kw, in, out); PyTorch's Conv2d weight
(out, in, kh, kw) is `kernel.transpose(3, 2, 0, 1)`. Linear kernels are PyTorch `weight.T`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bigvl.models import multiway as mw
from bigvl.models.layers.attention import check_attention
from bigvl.models.layers.init import abstract, linear, param, partitioned, trunc_normal
from bigvl.models.layers.stack import check_remat_policy
from bigvl.models.layers.vit import PatchEmbedding

VARIANTS: dict[str, dict[str, Any]] = {
    # A 2-core CPU trains this in minutes; vocab_size should be the caller's tokenizer size.
    "tiny": dict(width=128, heads=4, depth=2, vl_depth=1, mlp_dim=512, out_dim=128,
                 patch_size=8, image_size=48, text_positions=64, vocab_size=1024),
    # Released models. The names are the authors'; the smallest was first released as "0.2B".
    "0.4B": dict(width=768, heads=12, depth=9, vl_depth=3, mlp_dim=3072, out_dim=768,
                 patch_size=16, image_size=224, text_positions=1024, vocab_size=115244),
    "1B": dict(width=1024, heads=16, depth=21, vl_depth=3, mlp_dim=4096, out_dim=1024,
               patch_size=16, image_size=224, text_positions=1024, vocab_size=115244),
    "10B": dict(width=4096, heads=32, depth=21, vl_depth=3, mlp_dim=16384, out_dim=1024,
                patch_size=16, image_size=224, text_positions=1024, vocab_size=115244),
}


@dataclasses.dataclass(frozen=True)
class M2Config:
  """Sizes and numerics of an M²-Encoder.

  `text_positions` is the number of rows of the text position table; since ids start at 2, texts may
  have up to `text_positions - 2` tokens.
  """
  width: int
  heads: int
  depth: int              # bottom (Multiway) layers
  vl_depth: int           # top layers shared by both modalities
  mlp_dim: int
  out_dim: int
  patch_size: int
  image_size: int
  vocab_size: int
  text_positions: int
  ln_eps: float = 1e-5
  init_std: float = 0.02
  dtype: Any = jnp.float32          # compute dtype
  param_dtype: Any = jnp.float32
  remat: bool = False               # rematerialise each layer (jax.checkpoint) ...
  remat_policy: str = "full"        # ... keeping what layers.stack.REMAT_POLICIES names
  scan_layers: bool = False         # run each stack as one lax.scan (same parameters, same result)
  attention: str = "xla"            # layers.attention.ATTENTION: how softmax(q·k)·v is computed

  def __post_init__(self):
    # Accept "bfloat16" as well as jnp.bfloat16 (configs carry strings).
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
    check_attention(self.attention, self.dtype, self.width // max(1, self.heads))
    if self.width % self.heads:
      raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
    check_remat_policy(self.remat_policy)
    if self.image_size % self.patch_size:
      raise ValueError(
          f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
    if self.text_positions < 3:
      raise ValueError("text_positions counts the 2 unused offset rows; it must be at least 3")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def vision_positions(self) -> int:
    """Rows of the vision position table: 2 offset rows, CLS, then the patches."""
    return self.num_patches + 3

  @property
  def max_text_len(self) -> int:
    return self.text_positions - 2


def config_for(variant: str, **overrides) -> M2Config:
  if variant not in VARIANTS:
    raise ValueError(f"unknown M2-Encoder variant {variant!r}; known: {sorted(VARIANTS)}")
  return M2Config(**{**VARIANTS[variant], **overrides})


def _embed(cfg: M2Config, num: int, names: tuple[str, str], rngs: nnx.Rngs) -> nnx.Embed:
  return nnx.Embed(num, cfg.width, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                   embedding_init=partitioned(trunc_normal(cfg.init_std), names), rngs=rngs)


class BEiT3(nnx.Module):
  """The bottom stack with both embeddings (`backbone.*` in checkpoints)."""

  def __init__(self, cfg: M2Config, rngs: nnx.Rngs):
    self.text_embed = _embed(cfg, cfg.vocab_size, ("vocab", "embed"), rngs)
    self.vision_embed = PatchEmbedding(cfg.width, cfg.patch_size, cfg.image_size, rngs=rngs,
                                       init=trunc_normal(cfg.init_std), dtype=cfg.dtype,
                                       param_dtype=cfg.param_dtype)
    positions = mw.Multiway(A=_embed(cfg, cfg.vision_positions, ("position", "embed"), rngs),
                            B=_embed(cfg, cfg.text_positions, ("position", "embed"), rngs))
    self.encoder = mw.Encoder(cfg, cfg.depth, mw.BRANCHES, rngs, embed_positions=positions)


class ITCHead(nnx.Module):
  """Bias-free projection to the contrastive space, in float32 (it is small and feeds the loss)."""

  def __init__(self, cfg: M2Config, rngs: nnx.Rngs):
    self.fc = linear(cfg.width, cfg.out_dim, ("embed", "proj"), use_bias=False,
                     kernel_init=trunc_normal(cfg.init_std), rngs=rngs,
                     dtype=jnp.float32, param_dtype=cfg.param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc(x.astype(jnp.float32))


def l2_normalize(x: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), 1e-24))


class M2Encoder(nnx.Module):
  """Two towers (A weights for images, B for text) joined by shared top layers."""

  def __init__(self, cfg: M2Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.backbone = BEiT3(cfg, rngs)
    self.backbone_vl = mw.Encoder(cfg, cfg.vl_depth, ("A",), rngs)
    self.itc_vl_image_proj = ITCHead(cfg, rngs)
    self.itc_vl_text_proj = ITCHead(cfg, rngs)
    self.logit_scale = param(jnp.asarray(math.log(1 / 0.07), cfg.param_dtype), ())

  def image_features(self, images: jax.Array) -> jax.Array:
    """The image embedding before its L2 normalisation (its norm is the model's too), (B, out_dim)
    float32; images: (B, H, W, 3) uint8 pixels or normalised to [-1, 1]."""
    x = self.backbone.vision_embed(images)
    x = self.backbone.encoder(x, None, "A")
    x = self.backbone_vl(x, None, "A")
    return self.itc_vl_image_proj(x[:, 0])

  def text_features(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """The text embedding before its L2 normalisation, (B, out_dim) float32; ids, mask: (B, L)
    int, mask 1 on real tokens, ids[:, 0] = [CLS]."""
    if ids.shape[1] > self.cfg.max_text_len:
      raise ValueError(f"text length {ids.shape[1]} > {self.cfg.max_text_len} positions")
    key_mask = mask.astype(bool)
    x = self.backbone.text_embed(ids)
    x = self.backbone.encoder(x, key_mask, "B")
    x = self.backbone_vl(x, key_mask, "A")
    return self.itc_vl_text_proj(x[:, 0])

  def image_depths(self, images: jax.Array) -> list[jax.Array]:
    """The image tower's token states at every depth, (B, 1 + patches, width) each: the embedded
    patches, each bottom layer's output (the last normalised), each top layer's (the last
    normalised: what `image_features` reads at CLS). 1 + depth + vl_depth entries."""
    x = self.backbone.vision_embed(images)
    x, bottom = self.backbone.encoder(x, None, "A", hidden=True)
    x, top = self.backbone_vl(x, None, "A", hidden=True)
    return [*bottom, *top, x]

  def text_depths(self, ids: jax.Array, mask: jax.Array) -> list[jax.Array]:
    """The text tower's token states at every depth, as `image_depths` (B, L, width) each."""
    key_mask = mask.astype(bool)
    x = self.backbone.text_embed(ids)
    x, bottom = self.backbone.encoder(x, key_mask, "B", hidden=True)
    x, top = self.backbone_vl(x, key_mask, "A", hidden=True)
    return [*bottom, *top, x]

  def encode_image(self, images: jax.Array) -> jax.Array:
    """images: (B, H, W, 3) uint8 pixels or normalised to [-1, 1] → (B, out_dim) float32, unit
    norm."""
    return l2_normalize(self.image_features(images))

  def encode_text(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """ids, mask: (B, L) int, mask 1 on real tokens, ids[:, 0] = [CLS] → (B, out_dim) float32."""
    return l2_normalize(self.text_features(ids, mask))

  def __call__(self, images: jax.Array, ids: jax.Array,
               mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.encode_image(images), self.encode_text(ids, mask)


def _abstract(cfg: M2Config) -> M2Encoder:
  return abstract(lambda rngs: M2Encoder(cfg, rngs=rngs))


def _size(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def count_params(cfg: M2Config) -> int:
  """Parameters bigvl creates, counted from shapes only (nothing is allocated)."""
  return _size(nnx.state(_abstract(cfg), nnx.Param))


def checkpoint_param_count(cfg: M2Config) -> int:
  """`count_params` plus the released-checkpoint weights bigvl does not create."""
  model = _abstract(cfg)
  # The unused top-stack B branch mirrors its A branch exactly: every layer piece, the final norm.
  top_b = _size(nnx.state(model.backbone_vl.layers, nnx.Param))
  top_b += _size(nnx.state(model.backbone_vl.layer_norm.A, nnx.Param))
  bottom_heads = 2 * cfg.width * cfg.out_dim   # itc_image_proj, itc_text_proj
  mask_token = cfg.width
  logit_vl_scale = 1
  return _size(nnx.state(model, nnx.Param)) + top_b + bottom_heads + mask_token + logit_vl_scale
