"""SyCoCa (arXiv 2401.02137) on M²-Encoder's Multiway towers: image–text contrast (ITC), image
captioning (IC, a text decoder cross-attending to image tokens) and text-guided masked image
modelling (TG-MIM, an image decoder that rebuilds masked patches from the visible ones and the
text), with attentive masking choosing the text-relevant patches.

  towers            an `M2Encoder` (its parameters keep their layout: `towers.*` exports to the
                    released PyTorch keys unchanged)
  caption_decoder   `layers.decoder.TextDecoder` over the image tokens of the top stack; its
                    vocabulary is the tokenizer's plus one language tag per language, which starts
                    every caption (and so picks the language a caption is generated in)
  image_decoder     `ImageDecoder`: the visible patches' tokens from a second, MAE-style pass of
                    the image tower over those patches only, mask tokens elsewhere, bidirectional
                    blocks with cross-attention to the text tokens, and a linear head to pixels

The masked patches never enter the tower's second pass, so what the decoder knows of them comes
from the neighbouring visible patches and from the text.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bigvl.models import m2_encoder
from bigvl.models.layers.attention import Attention
from bigvl.models.layers.block import Block
from bigvl.models.layers.decoder import TextDecoder
from bigvl.models.layers.factories import Linears
from bigvl.models.layers.init import param, trunc_normal
from bigvl.models.layers.mlp import MLP
from bigvl.models.layers.stack import run_layers

LANGS = ("en", "zh")
MASKING = ("attention", "similarity", "random")


@dataclasses.dataclass(frozen=True)
class SyCoCaConfig:
  towers: m2_encoder.M2Config
  decoder_depth: int = 2
  decoder_width: int = 0          # 0: the towers' width
  decoder_heads: int = 0          # 0: the towers' heads
  decoder_mlp_dim: int = 0        # 0: the towers' mlp_dim
  caption_len: int = 64           # decoder positions: the language tag and the caption's tokens
  mim_depth: int = 2
  mim_width: int = 0
  mim_heads: int = 0
  mim_mlp_dim: int = 0

  def size(self, name: str) -> int:
    value = getattr(self, name)
    base = {"width": self.towers.width, "heads": self.towers.heads,
            "mlp_dim": self.towers.mlp_dim}[name.split("_", 1)[1]]
    return value or base

  @property
  def caption_vocab(self) -> int:
    return self.towers.vocab_size + len(LANGS)

  def lang_tag(self, lang: int | jax.Array) -> Any:
    """The token id that starts a caption in language LANGS[lang]."""
    return self.towers.vocab_size + lang


class ImageDecoder(nnx.Module):
  """(visible tokens, their patch indices, text tokens) → pixels of every patch (B, N, p·p·3)."""

  def __init__(self, cfg: SyCoCaConfig, rngs: nnx.Rngs):
    t = cfg.towers
    width, heads, mlp = cfg.size("mim_width"), cfg.size("mim_heads"), cfg.size("mim_mlp_dim")
    make = Linears(rngs, dtype=t.dtype, param_dtype=t.param_dtype,
                   kernel_init=lambda gain: trunc_normal(t.init_std, gain))
    self.num_patches = t.num_patches
    self.remat, self.remat_policy, self.scan_layers = t.remat, t.remat_policy, t.scan_layers
    self.in_proj = make.linear(t.width, width, ("embed", "mlp"))
    self.mask_token = param(trunc_normal(t.init_std)(rngs.params(), (width,), t.param_dtype),
                            ("embed",))
    self.pos_embed = param(trunc_normal(t.init_std)(rngs.params(), (t.num_patches + 1, width),
                                                    t.param_dtype), ("position", "embed"))

    def attn(mode: str) -> Attention:
      return Attention(width, num_heads=heads, mode=mode, linear=make.linear, impl=t.attention,
                       kv_width=t.width if mode == "cross" else None)

    self.blocks = nnx.List([
        Block(width, attention=attn, mlp=lambda: MLP(width, mlp, linear=make.linear),
              norm=make.norm, cross=True) for _ in range(cfg.mim_depth)])
    self.norm = make.norm(width)
    self.head = make.linear(width, t.patch_size * t.patch_size * 3, ("embed", None))

  def __call__(self, visible: jax.Array, visible_idx: jax.Array, text: jax.Array,
               text_mask: jax.Array) -> jax.Array:
    """visible (B, 1 + V, W): the tower's CLS and visible-patch tokens; visible_idx (B, V);
    text (B, L, W), text_mask (B, L) bool → (B, N, p·p·3) float32 pixel predictions."""
    b = visible.shape[0]
    x = self.in_proj(visible)
    seq = jnp.broadcast_to(self.mask_token[...].astype(x.dtype), (b, self.num_patches + 1,
                                                                  x.shape[-1]))
    slots = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), visible_idx + 1], axis=1)
    seq = seq.at[jnp.arange(b)[:, None], slots].set(x)
    seq = seq + self.pos_embed[...][None].astype(x.dtype)

    def run(block, x, text, mask):
      return block(x, context=text, context_mask=mask)

    seq = run_layers(self.blocks, seq, run, text.astype(seq.dtype), text_mask,
                     remat=self.remat, remat_policy=self.remat_policy, scan=self.scan_layers)
    return self.head(self.norm(seq))[:, 1:].astype(jnp.float32)


class SyCoCa(nnx.Module):
  def __init__(self, cfg: SyCoCaConfig, *, rngs: nnx.Rngs):
    t = cfg.towers
    self.cfg = cfg
    self.towers = m2_encoder.M2Encoder(t, rngs=rngs)
    self.caption_decoder = TextDecoder(
        vocab_size=cfg.caption_vocab, width=cfg.size("decoder_width"), depth=cfg.decoder_depth,
        heads=cfg.size("decoder_heads"), mlp_dim=cfg.size("decoder_mlp_dim"),
        max_len=cfg.caption_len, context_width=t.width, rngs=rngs, init_std=t.init_std,
        dtype=t.dtype, param_dtype=t.param_dtype, attention=t.attention, remat=t.remat,
        remat_policy=t.remat_policy, scan_layers=t.scan_layers)
    self.image_decoder = ImageDecoder(cfg, rngs)

  # ------------------------------------------------------------------ towers
  def image_tokens(self, images: jax.Array, *, cls_attention: bool = False):
    """All tokens of the top stack, (B, 1 + N, W); with `cls_attention` also the last layer's
    CLS→patch attention (B, N)."""
    t = self.towers
    x = t.backbone.vision_embed(images)
    x = t.backbone.encoder(x, None, "A")
    return t.backbone_vl(x, None, "A", cls_attention=cls_attention)

  def visible_tokens(self, images: jax.Array, visible_idx: jax.Array) -> jax.Array:
    """The image tower over CLS and the visible patches only (B, 1 + V, W), each at its own
    position."""
    t = self.towers
    x = t.backbone.vision_embed(images)
    b = x.shape[0]
    slots = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), visible_idx + 1], axis=1)
    x = jnp.take_along_axis(x, slots[..., None], axis=1)
    x = t.backbone.encoder(x, None, "A", positions=slots + 2)
    return t.backbone_vl(x, None, "A")

  def text_tokens(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    t = self.towers
    if ids.shape[1] > t.cfg.max_text_len:
      raise ValueError(f"text length {ids.shape[1]} > {t.cfg.max_text_len} positions")
    key_mask = mask.astype(bool)
    x = t.backbone.text_embed(ids)
    x = t.backbone.encoder(x, key_mask, "B")
    return t.backbone_vl(x, key_mask, "A")

  def image_embedding(self, tokens: jax.Array) -> jax.Array:
    return m2_encoder.l2_normalize(self.towers.itc_vl_image_proj(tokens[:, 0]))

  def text_embedding(self, tokens: jax.Array) -> jax.Array:
    return m2_encoder.l2_normalize(self.towers.itc_vl_text_proj(tokens[:, 0]))

  def patch_text_similarity(self, image_tokens: jax.Array, ztxt: jax.Array) -> jax.Array:
    """Cosine of each patch token, in the contrastive space, with the text embedding: (B, N)."""
    zp = m2_encoder.l2_normalize(self.towers.itc_vl_image_proj(image_tokens[:, 1:]))
    return jnp.einsum("bnd,bd->bn", zp, ztxt.astype(zp.dtype))

  # ------------------------------------------------------------------ heads
  def caption_logits(self, ids: jax.Array, image_tokens: jax.Array,
                     context_mask: jax.Array | None = None) -> jax.Array:
    return self.caption_decoder(ids, context=image_tokens, context_mask=context_mask)

  def reconstruct(self, images: jax.Array, visible_idx: jax.Array, text_tokens: jax.Array,
                  text_mask: jax.Array) -> jax.Array:
    visible = self.visible_tokens(images, visible_idx)
    return self.image_decoder(visible, visible_idx, text_tokens, text_mask.astype(bool))
