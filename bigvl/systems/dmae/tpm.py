"""TPM-CL (arXiv 2309.11082): partial samples as automatic fine-grained hard negatives, and the
margin-ranking loss that ranks each matched pair above its partial versions.

A cross-modal weight predictor scores one modality's tokens conditioned on the other modality;
dropping the top tokens that hold 60% of the weight gives a "partial" sample that still looks like
its pair but has lost what matters most:
  t_g   = normalise(Σ_w a_w t_w)        the words re-weighted by a (predicted from the video),
  t_g'  = the same over the words the selector keeps,
  v'    = the frames the selector keeps (weights b predicted from the sentence feature t).
On matched pairs only (row i against video i), with s the token-wise similarity
(`similarity.pair_similarity`; a sentence vector is a text of one token) and
m(x, y) = mean_i max(0, margin − (x_i − y_i)):
  partial_type 2: m(s(t, v), s(t, v')) + m(s(t_g, v), s(t_g, v'))
  partial_type 3: m(s(t_g, v), s(t_g', v))
  partial_type 4: all three.

From the authors' code (AntMMF prj/dmae_vtp: dmae_utils.py `get_partial_similarity`,
`_get_partial_output`, `_get_partial_loss`; tpmcl_utils.py `LinearXWeightPredictor`,
`TokenImportanceSelector`), with these differences, each a defect there:
  * they score every text against every video of 8×16 blocks and keep only the diagonal; their
    (t_g, v') pairs are laid out in two different orders, so that diagonal is mispaired whenever a
    block's text and video counts differ (8 vs 16, every full block). Here only the B matched pairs
    are scored, paired by construction.
  * their predictor normalises its sigmoid outputs over all positions, padding included, and its
    LayerNorm spans [tokens, 2d] jointly, so padding changes every weight; here the LayerNorm is
    per token and the weights sum to 1 over valid tokens only.
  * their conditioning projects the other modality along its sequence axis (a Linear from Nq
    positions to Nk positions: fixed lengths, padding mixed in, absolute positions matter); here
    q is the other modality's global feature (the [CLS] sentence feature for frame weights, the
    masked mean of the frames for word weights) through a Linear(d → d), shared by every token.
  * t_g is L2-normalised there but t_g' is not, so s(t_g', v) is lowered by its shorter length as
    much as by what it lost; both are normalised here.
  * their v' keeps the dropped frames as zero vectors that still count as valid (a 0 in every
    max and in the v2t mean), and only v' goes through the temporal transformer (seqTransf), v
    does not; here the dropped frames leave the frame mask of the same frame features.
  * their pair similarity in the default "wti" mode contracts the learned weights over every row
    of the block (einsum 'ct,bt->c'), scaling each score with the block size; here (`similarity`)
    the weights are the pair's own.
Like theirs, the frame weights reach the loss only through the (non-differentiable) selection, so
the frame predictor gets no gradient from these margins; the word weights do (through t_g, t_g').
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from bigvl.losses.ranking import margin_ranking
from bigvl.models.layers.factories import Linears
from bigvl.models.layers.mlp import ACTIVATIONS
from bigvl.models.layers.video import masked_mean
from bigvl.systems.dmae.similarity import pair_similarity

PARTIAL_TYPES = (2, 3, 4)


def _l2(x: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), 1e-24))


class WeightPredictor(nnx.Module):
  """Token weights of one modality given the other: concat[proj(q), k] → LayerNorm →
  Linear(2d → d/2) → GELU → Linear(→ 1) → sigmoid, normalised to sum 1 over the valid tokens.
  Linears without bias, as the authors'."""

  def __init__(self, d: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    make = Linears(rngs, dtype=dtype, param_dtype=param_dtype)
    self.q_proj = make.linear(d, d, ("embed", "mlp"), use_bias=False)
    self.norm = make.norm(2 * d)
    self.fc1 = make.linear(2 * d, d // 2, ("embed", "mlp"), use_bias=False)
    self.fc2 = make.linear(d // 2, 1, ("mlp", None), use_bias=False)

  def __call__(self, q: jax.Array, k: jax.Array, k_mask: jax.Array) -> jax.Array:
    """q (B, d) the other modality's global feature, k (B, N, d) the tokens to weigh, k_mask
    (B, N) nonzero on valid tokens → float32 (B, N) weights, 0 on padding, summing to 1."""
    q = jnp.broadcast_to(self.q_proj(q)[:, None, :], k.shape)
    h = self.norm(jnp.concatenate([q, k.astype(q.dtype)], axis=-1))
    h = self.fc2(ACTIVATIONS["gelu"](self.fc1(h)))[..., 0]
    w = jnp.where(k_mask > 0, jax.nn.sigmoid(h.astype(jnp.float32)), 0.0)
    return w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1e-12)


def select_partial(weights: jax.Array, mask: jax.Array, threshold: float = 0.6) -> jax.Array:
  """Bool keep mask (..., N): sort the valid tokens' weights (renormalised to sum 1) in descending
  order and drop those whose cumulative weight (their own included) is below `threshold`; keep the
  rest. [.5, .3, .1, .1] drops token 0 only (.5 < .6 ≤ .8). The last valid token reaches 1, so one
  is always kept; ties keep their order."""
  valid = mask > 0
  w = jnp.where(valid, weights.astype(jnp.float32), 0.0)
  w = w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1e-12)
  order = jnp.argsort(-w, axis=-1, stable=True)
  cum = jnp.cumsum(jnp.take_along_axis(w, order, axis=-1), axis=-1)
  rank = jnp.argsort(order, axis=-1)
  dropped = jnp.take_along_axis(cum < threshold, rank, axis=-1)
  return valid & ~dropped


def tpm_margin_loss(t: jax.Array, t_weight: jax.Array, v: jax.Array, v_mask: jax.Array, *,
                    text_weigher: WeightPredictor, frame_weigher: WeightPredictor,
                    partial_type: int = 4, threshold: float = 0.6, margin: float = 0.6,
                    visual_cue: bool = False, cue_scale: float = 0.5,
                    t_global: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """TPM-CL's margin loss on the B matched pairs (text i, video i) → (loss, aux).

  Args:
    t: (B, L, d) token features, L2-normalised, the sentence feature at position 0 ([CLS], as
      `VideoTextModel.encode_text`) unless `t_global` (B, d) is given.
    t_weight: (B, L), > 0 exactly on the words (specials and padding 0): which tokens are words.
    v, v_mask: (B, Nv, d) frame features (L2-normalised) and (B, Nv) frame mask.
    visual_cue, cue_scale: passed to every similarity (the authors' partial similarities have no
      cue; pass False for theirs, True to rank with the retrieval's own similarity).
  aux: each margin term present ("t_v", "tg_v", "tg_tgp") and the kept fractions of words and
  frames.
  """
  if partial_type not in PARTIAL_TYPES:
    raise ValueError(f"partial_type={partial_type}: use one of {PARTIAL_TYPES}")
  words = t_weight > 0
  frames = v_mask > 0
  t_glob = t[:, 0] if t_global is None else t_global
  v_glob = _l2(masked_mean(v.astype(jnp.float32), frames))
  a = text_weigher(v_glob, t, words)             # words given the video
  b = frame_weigher(t_glob, v, frames)           # frames given the sentence
  keep_w = select_partial(a, words, threshold)
  keep_f = select_partial(b, frames, threshold)
  t_g = _l2(jnp.einsum("bl,bld->bd", a, t.astype(jnp.float32)))
  t_gp = _l2(jnp.einsum("bl,bld->bd", a * keep_w, t.astype(jnp.float32)))

  one = jnp.ones((t.shape[0], 1), jnp.int32)
  sim = functools.partial(pair_similarity, visual_cue=visual_cue, cue_scale=cue_scale)

  def s(sentence, frame_mask):
    return sim(sentence[:, None, :], None, one, v, frame_mask)

  terms: dict[str, jax.Array] = {}
  if partial_type in (2, 4):
    terms["t_v"] = margin_ranking(s(t_glob, frames), s(t_glob, keep_f), margin)
  s_gv = s(t_g, frames)
  if partial_type in (2, 4):
    terms["tg_v"] = margin_ranking(s_gv, s(t_g, keep_f), margin)
  if partial_type in (3, 4):
    terms["tg_tgp"] = margin_ranking(s_gv, s(t_gp, frames), margin)
  loss = sum(terms.values())
  n_words = jnp.maximum(jnp.sum(words, axis=-1), 1)
  n_frames = jnp.maximum(jnp.sum(frames, axis=-1), 1)
  aux = dict(terms)
  aux["kept_words"] = jnp.mean(jnp.sum(keep_w, axis=-1) / n_words)
  aux["kept_frames"] = jnp.mean(jnp.sum(keep_f, axis=-1) / n_frames)
  return loss, aux
