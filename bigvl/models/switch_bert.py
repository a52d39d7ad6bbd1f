"""Switch-BERT (arXiv 2306.14182): a fusion encoder whose layers learn how modalities interact.

The caller hands over each modality's tower states at several depths (e.g. a frozen M²-Encoder's
layer outputs): `text_bank` (D_t, B, Nt, text_in) and `image_bank` (D_v, B, Nv, image_in). Each bank
is projected to `width` (LayerNorm + linear, shared over depths, plus a type embedding); the fusion
state entering layer 1 is the projected last depth of each bank. Every layer is one pre-LN
transformer layer (attention + MLP) whose weights both modalities share, as in single-stream models,
and two learned choices per (layer, query modality m):

  α (layer-wise interaction)  out_m = Σ_mode α_mode · Attn_mode over `ATTENTION_MODES`: intra (own
                              modality only), inter (the other only), joint (both). The q·k scores
                              are computed once; each mode is a masked softmax over them.
  β (cross-layer input)       the keys/values m reads for the other modality m' are Σ_d β_d · C_d
                              over m''s candidates: its projected depth bank (D_{m'} entries), then
                              the fusion states of m' output by layers 1..l-1. At layer l the last
                              of its D_{m'} + l - 1 candidates is m''s current state.

Weight arrays have fixed sizes: α (L, 2, 3) and β (L, 2, K) with K = max(D_t, D_v) + L - 1, β[l, m]
weighting the candidates of the modality *other* than m (index 0 = text, 1 = image); candidates
not yet available at layer l are masked out (weight exactly 0, `candidate_mask`). Logits start at
zero (uniform); they become probabilities by softmax(logits / tau) or, training with
`selection="gumbel"` and an rng, by Gumbel-softmax (optionally straight-through, `hard`).

`modes="joint"` is the fixed single-stream baseline: no α/β parameters, every layer joint attention
over [text; image] current states (α one-hot on joint, β one-hot on the current state), which is
plain full attention with the text padding mask.

Heads: VQA (MLP on text CLS ⊕ mean image state), ITM (linear on the same pair) and referring
expressions (each candidate box pools the image states by its patch overlap, `box_patch_weights`).
Attribute names inside a layer are the shared block's (`self_attn.q_proj`, `self_attn_layer_norm`,
`ffn`, `final_layer_norm`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigvl.models.layers.attention import MASK_VALUE, Attention
from bigvl.models.layers.factories import Linears
from bigvl.models.layers.init import param, trunc_normal
from bigvl.models.layers.mlp import ACTIVATIONS, MLP
from bigvl.parallel.sharding import constrain

ATTENTION_MODES = ("intra", "inter", "joint")
MODES = ("learned", "joint")
SELECTIONS = ("softmax", "gumbel")
TEXT, IMAGE = 0, 1


@dataclasses.dataclass(frozen=True)
class SwitchConfig:
  """Sizes and choices of a Switch-BERT fusion encoder and its heads.

  depth: fusion layers L; text_depths / image_depths: entries D_t / D_v of the input banks;
  text_in / image_in: their feature widths; modes: "learned" (α, β parameters) or "joint" (the
  fixed single-stream baseline); selection: how logits become weights when an rng is given.
  """
  width: int
  heads: int
  mlp_dim: int
  depth: int
  text_in: int
  image_in: int
  text_depths: int
  image_depths: int
  modes: str = "learned"
  selection: str = "softmax"
  num_answers: int = 2
  refer_depths: bool = False   # the referring head also pools every depth of the image bank
  ln_eps: float = 1e-5
  init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
    if self.modes not in MODES:
      raise ValueError(f"modes={self.modes!r}: use one of {MODES}")
    if self.selection not in SELECTIONS:
      raise ValueError(f"selection={self.selection!r}: use one of {SELECTIONS}")
    if self.width % self.heads:
      raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
    if min(self.depth, self.text_depths, self.image_depths) < 1:
      raise ValueError("depth, text_depths and image_depths must be at least 1")

  @property
  def num_candidates(self) -> int:
    """K: the β entries per (layer, modality), max(D_t, D_v) + L - 1."""
    return max(self.text_depths, self.image_depths) + self.depth - 1

  def other_depths(self, m: int) -> int:
    """D of the modality that m's queries read through the switch."""
    return self.image_depths if m == TEXT else self.text_depths


@functools.lru_cache(maxsize=None)
def mode_masks(nt: int, nv: int) -> np.ndarray:
  """(3, Nt+Nv, Nt+Nv) bool over the joint sequence [text; image], rows = queries, cols = keys:
  intra (same modality), inter (the other one), joint (all). Cached per shape, read-only."""
  modality = np.concatenate([np.full(nt, TEXT), np.full(nv, IMAGE)])
  same = modality[:, None] == modality[None, :]
  masks = np.stack([same, ~same, np.ones_like(same)])
  masks.flags.writeable = False
  return masks


@functools.lru_cache(maxsize=None)
def candidate_mask(text_depths: int, image_depths: int, depth: int) -> np.ndarray:
  """(L, 2, K) bool: True where β[l, m, k] is a candidate available at layer l (0-based) to m's
  queries, i.e. k < D_{other(m)} + l. Cached, read-only."""
  k = max(text_depths, image_depths) + depth - 1
  other = np.array([image_depths, text_depths])
  mask = np.arange(k)[None, None, :] < (other[None, :, None] + np.arange(depth)[:, None, None])
  mask.flags.writeable = False
  return mask


def _select(logits: jax.Array, valid: np.ndarray, key: jax.Array | None, tau, hard: bool
            ) -> jax.Array:
  """softmax((logits + optional Gumbel noise) / tau) over the last axis, exactly 0 where not
  `valid`; `hard`: straight-through one-hot of the argmax."""
  x = logits.astype(jnp.float32)
  if key is not None:
    x = x + jax.random.gumbel(key, x.shape, jnp.float32)
  x = jnp.where(valid, x / tau, MASK_VALUE)
  y = jnp.where(valid, jax.nn.softmax(x, axis=-1), 0.0)
  if hard:
    one_hot = jax.nn.one_hot(jnp.argmax(x, axis=-1), x.shape[-1], dtype=y.dtype)
    y = one_hot + y - jax.lax.stop_gradient(y)
  return y


def box_patch_weights(boxes: jax.Array, grid: int, has_cls: bool = False) -> jax.Array:
  """boxes (B, K, 4) as x0, y0, x1, y1 image fractions → (B, K, [1 +] grid²) float32: each box's
  overlap area with each patch (raster order), normalised to sum 1 per box (all 0 for a box that
  covers no area); a leading CLS token, if `has_cls`, gets 0."""
  boxes = jnp.clip(boxes.astype(jnp.float32), 0.0, 1.0)
  edges = jnp.arange(grid + 1, dtype=jnp.float32) / grid
  lo, hi = edges[:-1], edges[1:]

  def overlap(a, b):   # (B, K) intervals against the grid's cells → (B, K, grid)
    return jnp.maximum(0.0, jnp.minimum(b[..., None], hi) - jnp.maximum(a[..., None], lo))

  ox = overlap(boxes[..., 0], boxes[..., 2])
  oy = overlap(boxes[..., 1], boxes[..., 3])
  area = (oy[..., :, None] * ox[..., None, :]).reshape(*boxes.shape[:-1], grid * grid)
  weights = area / jnp.maximum(area.sum(-1, keepdims=True), 1e-12)
  if has_cls:
    weights = jnp.concatenate([jnp.zeros_like(weights[..., :1]), weights], axis=-1)
  return weights


class SwitchLayer(nnx.Module):
  """One fusion layer: mode-mixed attention with switched partner inputs, then an MLP, each pre-LN
  and residual; its weights are shared by both modalities."""

  def __init__(self, cfg: SwitchConfig, make: Linears):
    self.self_attn = Attention(cfg.width, num_heads=cfg.heads, linear=make.linear)
    self.self_attn_layer_norm = make.norm(cfg.width)
    self.ffn = MLP(cfg.width, cfg.mlp_dim, linear=make.linear)
    self.final_layer_norm = make.norm(cfg.width)

  def __call__(self, text: jax.Array, image: jax.Array, text_partner: jax.Array,
               image_partner: jax.Array, key_mask: jax.Array, alpha: jax.Array,
               modes: tuple[int, ...] = (0, 1, 2)) -> tuple[jax.Array, jax.Array]:
    """text (B, Nt, W), image (B, Nv, W): current states; text_partner / image_partner: what image /
    text queries read as the other modality (the switched mixes); key_mask (B, Nt+Nv) bool;
    alpha (2, 3) per query modality; modes: the modes whose weights may be nonzero (others are
    skipped). → new (text, image)."""
    a, ln = self.self_attn, self.self_attn_layer_norm
    b, nt, nv = text.shape[0], text.shape[1], image.shape[1]
    n = nt + nv

    def split_heads(x):
      return x.reshape(b, x.shape[1], a.num_heads, a.head_dim)

    x = jnp.concatenate([text, image], axis=1)
    h = ln(jnp.concatenate([x, text_partner, image_partner], axis=1))
    q = split_heads(a.q_proj(h[:, :n]) * (a.head_dim ** -0.5))
    k, v = split_heads(a.k_proj(h)), split_heads(a.v_proj(h))
    # Keys/values per query modality: its own current block, the other block switched.
    own_t, own_v, part_t, part_v = (slice(0, nt), slice(nt, n), slice(n, n + nt),
                                    slice(n + nt, n + nt + nv))
    k_t, v_t = (jnp.concatenate([z[:, own_t], z[:, part_v]], axis=1) for z in (k, v))
    k_v, v_v = (jnp.concatenate([z[:, part_t], z[:, own_v]], axis=1) for z in (k, v))
    scores = jnp.concatenate([
        jnp.einsum("bqhd,bkhd->bhqk", q[:, :nt], k_t, preferred_element_type=jnp.float32),
        jnp.einsum("bqhd,bkhd->bhqk", q[:, nt:], k_v, preferred_element_type=jnp.float32)],
        axis=2)                                                            # (B, H, N, N)
    allowed = (jnp.asarray(mode_masks(nt, nv)[list(modes)])[:, None, None]
               & key_mask[None, :, None, None, :])                        # (M, B, 1, N, N)
    probs = jax.nn.softmax(jnp.where(allowed, scores[None], MASK_VALUE), axis=-1)
    probs = jnp.where(allowed, probs, 0.0)       # a row with no allowed key gives 0, not uniform
    row_alpha = jnp.repeat(alpha.astype(jnp.float32)[:, list(modes)], np.array([nt, nv]), axis=0,
                           total_repeat_length=n)                          # (N, M)
    mixed = jnp.einsum("mbhqk,qm->bhqk", probs, row_alpha).astype(v.dtype)
    out = jnp.concatenate([jnp.einsum("bhqk,bkhd->bqhd", mixed[:, :, :nt], v_t),
                           jnp.einsum("bhqk,bkhd->bqhd", mixed[:, :, nt:], v_v)], axis=1)
    x = x + a.out_proj(out.reshape(b, n, a.num_heads * a.head_dim))
    x = x + self.ffn(self.final_layer_norm(x))
    x = constrain(x, ("batch", "length", "embed"))
    return x[:, :nt], x[:, nt:]


class SwitchEncoder(nnx.Module):
  """(text_bank, image_bank, text_mask) → (text_states (B, Nt, W), image_states (B, Nv, W))."""

  def __init__(self, cfg: SwitchConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    make = Linears(rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                   kernel_init=lambda gain: trunc_normal(cfg.init_std, gain), norm_eps=cfg.ln_eps)
    self.text_in_norm = make.norm(cfg.text_in)
    self.text_in_proj = make.linear(cfg.text_in, cfg.width, ("embed", "mlp"))
    self.image_in_norm = make.norm(cfg.image_in)
    self.image_in_proj = make.linear(cfg.image_in, cfg.width, ("embed", "mlp"))
    self.type_embed = param(trunc_normal(cfg.init_std)(rngs.params(), (2, cfg.width),
                                                       cfg.param_dtype), (None, "embed"))
    self.layers = nnx.List([SwitchLayer(cfg, make) for _ in range(cfg.depth)])
    self.layer_norm = make.norm(cfg.width)
    if cfg.modes == "learned":
      self.alpha_logits = param(jnp.zeros((cfg.depth, 2, len(ATTENTION_MODES)), cfg.param_dtype),
                                (None, None, None))
      self.beta_logits = param(jnp.zeros((cfg.depth, 2, cfg.num_candidates), cfg.param_dtype),
                               (None, None, None))
    else:
      self.alpha_logits = self.beta_logits = None

  def mixing_weights(self, rng: jax.Array | None = None, tau: float | jax.Array = 1.0,
                     hard: bool = False) -> tuple[jax.Array, jax.Array]:
    """(alpha (L, 2, 3), beta (L, 2, K)) float32 probabilities, masked β entries exactly 0.

    softmax(logits / tau); with selection="gumbel" and an `rng`, Gumbel-softmax; `hard`:
    straight-through one-hot. modes="joint": fixed one-hot weights (joint mode; the current
    partner state), whatever the arguments.
    """
    cfg = self.cfg
    valid = candidate_mask(cfg.text_depths, cfg.image_depths, cfg.depth)
    if cfg.modes == "joint":
      alpha = jnp.zeros((cfg.depth, 2, len(ATTENTION_MODES)), jnp.float32).at[..., 2].set(1.0)
      last = valid.sum(-1) - 1                                             # (L, 2)
      return alpha, jax.nn.one_hot(last, cfg.num_candidates, dtype=jnp.float32)
    key_a = key_b = None
    if rng is not None and cfg.selection == "gumbel":
      key_a, key_b = jax.random.split(rng)
    alpha = _select(self.alpha_logits[...], np.ones((1, 1, 3), bool), key_a, tau, hard)
    beta = _select(self.beta_logits[...], valid, key_b, tau, hard)
    return alpha, beta

  def project_image(self, image_bank: jax.Array) -> jax.Array:
    """The image bank at `width` with its type embedding, (D_v, B, Nv, W)."""
    return (self.image_in_proj(self.image_in_norm(image_bank))
            + self.type_embed[...][IMAGE].astype(self.cfg.dtype))

  def project(self, text_bank: jax.Array, image_bank: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The banks at `width` with their type embeddings: (D_t, B, Nt, W), (D_v, B, Nv, W)."""
    cfg, types = self.cfg, self.type_embed[...]
    for name, bank, d, f in (("text_bank", text_bank, cfg.text_depths, cfg.text_in),
                             ("image_bank", image_bank, cfg.image_depths, cfg.image_in)):
      if bank.ndim != 4 or bank.shape[0] != d or bank.shape[-1] != f:
        raise ValueError(f"{name} must be (depths={d}, B, N, {f}), got {bank.shape}")
    text = self.text_in_proj(self.text_in_norm(text_bank)) + types[TEXT].astype(cfg.dtype)
    image = self.image_in_proj(self.image_in_norm(image_bank)) + types[IMAGE].astype(cfg.dtype)
    return text, image

  def __call__(self, text_bank: jax.Array, image_bank: jax.Array, text_mask: jax.Array, *,
               rng: jax.Array | None = None, tau: float | jax.Array = 1.0,
               hard: bool = False) -> tuple[jax.Array, jax.Array]:
    """text_bank (D_t, B, Nt, text_in), image_bank (D_v, B, Nv, image_in), text_mask (B, Nt) bool or
    int (True / 1 on real tokens) → final-normed (text (B, Nt, W), image (B, Nv, W))."""
    cfg = self.cfg
    bank_t, bank_v = self.project(text_bank, image_bank)
    b, nv = bank_v.shape[1], bank_v.shape[2]
    key_mask = jnp.concatenate([text_mask.astype(bool), jnp.ones((b, nv), bool)], axis=1)
    alpha, beta = self.mixing_weights(rng, tau, hard)
    modes = (2,) if cfg.modes == "joint" else (0, 1, 2)
    text, image = bank_t[-1], bank_v[-1]
    cands_t, cands_v = bank_t, bank_v
    for i, layer in enumerate(self.layers):
      if i:
        cands_t = jnp.concatenate([cands_t, text[None]])
        cands_v = jnp.concatenate([cands_v, image[None]])
      # β[i, m] has exactly D_{other} + i valid entries: the candidates stacked so far.
      image_partner = jnp.einsum("d,dbnw->bnw", beta[i, TEXT, :cands_v.shape[0]].astype(cfg.dtype),
                                 cands_v)
      text_partner = jnp.einsum("d,dbnw->bnw", beta[i, IMAGE, :cands_t.shape[0]].astype(cfg.dtype),
                                cands_t)
      text, image = layer(text, image, text_partner, image_partner, key_mask, alpha[i], modes)
    return self.layer_norm(text), self.layer_norm(image)


def _pool_pair(text_states: jax.Array, image_states: jax.Array) -> jax.Array:
  """concat(text CLS, mean image state): (B, 2W)."""
  return jnp.concatenate([text_states[:, 0], jnp.mean(image_states, axis=1)], axis=-1)


class SwitchBert(nnx.Module):
  """The fusion encoder and its VQA, ITM and referring-expression heads."""

  def __init__(self, cfg: SwitchConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.encoder = SwitchEncoder(cfg, rngs=rngs)
    make = Linears(rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                   kernel_init=lambda gain: trunc_normal(cfg.init_std, gain), norm_eps=cfg.ln_eps)
    w = cfg.width
    self.vqa_fc1 = make.linear(2 * w, 2 * w, ("embed", "mlp"))
    self.vqa_norm = make.norm(2 * w)
    self.vqa_fc2 = make.linear(2 * w, cfg.num_answers, ("mlp", None))
    self.itm_head = make.linear(2 * w, 1, ("embed", None))
    self.refer_fc1 = make.linear((3 + cfg.image_depths * cfg.refer_depths) * w, w,
                                 ("embed", "mlp"))
    self.refer_fc2 = make.linear(w, 1, ("mlp", None))

  def encode(self, text_bank: jax.Array, image_bank: jax.Array, text_mask: jax.Array, *,
             rng: jax.Array | None = None, tau: float | jax.Array = 1.0,
             hard: bool = False) -> tuple[jax.Array, jax.Array]:
    """`SwitchEncoder.__call__`."""
    return self.encoder(text_bank, image_bank, text_mask, rng=rng, tau=tau, hard=hard)

  def mixing_weights(self, rng: jax.Array | None = None, tau: float | jax.Array = 1.0,
                     hard: bool = False) -> tuple[jax.Array, jax.Array]:
    """`SwitchEncoder.mixing_weights`."""
    return self.encoder.mixing_weights(rng, tau, hard)

  def vqa_logits(self, text_states: jax.Array, image_states: jax.Array,
                 text_mask: jax.Array | None = None) -> jax.Array:
    """(B, num_answers) float32 from text CLS ⊕ mean image state. text_mask is not needed (CLS is
    never padding) and is accepted so that callers may pass the encoder's inputs unchanged."""
    h = ACTIVATIONS["gelu"](self.vqa_norm(self.vqa_fc1(_pool_pair(text_states, image_states))))
    return self.vqa_fc2(h).astype(jnp.float32)

  def itm_logit(self, text_states: jax.Array, image_states: jax.Array,
                text_mask: jax.Array | None = None) -> jax.Array:
    """(B,) float32 image–text match logit from the same pooled pair as `vqa_logits`."""
    return self.itm_head(_pool_pair(text_states, image_states))[:, 0].astype(jnp.float32)

  def refer_scores(self, text_states: jax.Array, image_states: jax.Array,
                   box_patch_weights: jax.Array, box_valid: jax.Array,
                   image_bank: jax.Array | None = None) -> jax.Array:
    """(B, K) float32 scores of candidate boxes; box_patch_weights (B, K, Nv) pool the image states
    per box (`box_patch_weights()`), box_valid (B, K) bool; invalid boxes get MASK_VALUE."""
    pooled = jnp.einsum("bkn,bnw->bkw", box_patch_weights.astype(image_states.dtype), image_states)
    cls = jnp.broadcast_to(text_states[:, None, 0], pooled.shape)
    parts = [pooled, cls, pooled * cls]
    if self.cfg.refer_depths:
      if image_bank is None:
        raise ValueError("refer_depths=True: pass the image bank (D_v, B, Nv, image_in)")
      bank = self.encoder.project_image(image_bank)
      per_depth = jnp.einsum("bkn,dbnw->bkdw", box_patch_weights.astype(bank.dtype), bank)
      parts.append(per_depth.reshape(*per_depth.shape[:2], -1))
    h = ACTIVATIONS["gelu"](self.refer_fc1(jnp.concatenate(parts, -1)))
    scores = self.refer_fc2(h)[..., 0].astype(jnp.float32)
    return jnp.where(box_valid.astype(bool), scores, MASK_VALUE)
