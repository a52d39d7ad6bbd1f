"""DMAE's token-wise text–video similarity (arXiv 2309.11082): every word against every frame, with
the visual cue (the best frame's most similar other frame) and the textual cue (word weights).

For a text's tokens t_w (w < Nt) and a video's frames v_k (k < Nv), L2-normalised,
S_wk = ⟨t_w, v_k⟩:
  t2v = Σ_w a_w · (S_wk* + cue_w),   k* = argmax over valid frames of S_wk,
        a = t_weight over the valid words, normalised to sum 1 (the textual cue: keywords 2,
        other words 1 — `bigvl.data.keywords` — or uniform);
  v2t = Σ_k b_k · max over valid words of S_wk,  b uniform over the valid frames (or v_weight);
  sim = (t2v + v2t) / 2.
Visual cue (DMAE): k₂(k) = the valid frame other than k most similar to it (frame–frame cosine
F_kj = ⟨v_k, v_j⟩), and cue_w = cue_scale · max(0, F_k*k₂) · S_wk₂ added to that word's t2v term
only (v2t has no cue).

These follow the authors' `_get_wti_similarity` (AntMMF prj/dmae_vtp, dmae_utils.py; the visual
cue is their `l3_with_nfc`, the textual cue their word mask replaced by 1 + [keyword]) with two of
its defects left out:
  * it masks by multiplying S by the masks and then takes maxima, so a padding frame (or word)
    competes with the value 0: every maximum is max(0, ·) when the other side is padded and not
    when it is full. Here padding never competes.
  * in its default "wti" mode the keyword weights (0/1/2, not normalised) multiply a learned
    softmax over the words, so the t2v weights sum to between 1 and 2 and a caption's score scale
    depends on how many keywords it has. Here the weights are normalised over the valid words
    (its "ti" mode); learned weights, if wanted, come in through t_weight and v_weight.
The max(0, ·) on F is theirs in effect: their frame–frame matrix has 0 on its diagonal and on
padding, so a best other frame with a negative cosine loses to those zeros and adds nothing. A
video with one valid frame gets no cue; a text without valid words or a video without valid frames
scores 0.

Memory: S for Bt texts × Bv videos is a (Bt, Bv, Nt, Nv) float32 tensor, and the cue adds one more
of that size: fine for the ring's blocks (`bigvl.losses.ring_pairwise`), not for a whole large
batch at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _normalised(weight: jax.Array | None, valid: jax.Array) -> jax.Array:
  """weight (1 where None) kept on the valid positions, summing to 1 over them (0 where none)."""
  w = valid.astype(jnp.float32) if weight is None else jnp.where(valid, weight, 0.0)
  w = w.astype(jnp.float32)
  return w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1e-12)


def frame_cue(v: jax.Array, v_valid: jax.Array, cue_scale: float) -> jax.Array:
  """(B, Nv, Nv) M with M[b, k] = cue_scale · max(0, F_k k₂(k)) · one_hot(k₂(k)): row k of M
  applied to a word's scores over frames gives its cue when k is its best frame."""
  n = v.shape[1]
  f = jnp.einsum("bkd,bjd->bkj", v, v, preferred_element_type=jnp.float32)
  other = v_valid[:, :, None] & v_valid[:, None, :] & ~jnp.eye(n, dtype=bool)
  k2 = jnp.argmax(jnp.where(other, f, -jnp.inf), axis=-1)
  best = jnp.take_along_axis(f, k2[..., None], axis=-1)[..., 0]
  weight = jnp.where(jnp.any(other, axis=-1), jax.nn.relu(best), 0.0)
  return cue_scale * weight[..., None] * jax.nn.one_hot(k2, n, dtype=jnp.float32)


def _reduce(s: jax.Array, cued: jax.Array, t_w: jax.Array, t_valid: jax.Array, v_w: jax.Array,
            v_valid: jax.Array) -> jax.Array:
  """sim from S (..., Nt, Nv) and S with the cue added; weights and masks broadcast to (..., Nt)
  and (..., Nv)."""
  k_star = jnp.argmax(jnp.where(v_valid[..., None, :], s, -jnp.inf), axis=-1)
  t2v_w = jnp.take_along_axis(cued, k_star[..., None], axis=-1)[..., 0]
  t2v = jnp.sum(t2v_w * t_w, axis=-1) * jnp.any(v_valid, axis=-1)
  w_star = jnp.argmax(jnp.where(t_valid[..., :, None], s, -jnp.inf), axis=-2)
  v2t_k = jnp.take_along_axis(s, w_star[..., None, :], axis=-2)[..., 0, :]
  v2t = jnp.sum(v2t_k * v_w, axis=-1) * jnp.any(t_valid, axis=-1)
  return 0.5 * (t2v + v2t)


def token_wise_similarity(t: jax.Array, t_weight: jax.Array | None, t_mask: jax.Array,
                          v: jax.Array, v_mask: jax.Array, *, visual_cue: bool = False,
                          cue_scale: float = 0.5, v_weight: jax.Array | None = None
                          ) -> jax.Array:
  """(Bt, Bv) similarity of every text with every video.

  Args:
    t: (Bt, Nt, d) token features; t_weight (Bt, Nt) word weights (None: uniform); t_mask
      (Bt, Nt), nonzero on valid words.
    v: (Bv, Nv, d) frame features; v_mask (Bv, Nv), nonzero on valid frames; v_weight (Bv, Nv)
      frame weights for v2t (None: uniform, as the authors' "ti").
  """
  t_valid, v_valid = t_mask > 0, v_mask > 0
  s = jnp.einsum("awd,bkd->abwk", t, v, preferred_element_type=jnp.float32)
  cued = s
  if visual_cue:
    cued = s + jnp.einsum("abwj,bkj->abwk", s, frame_cue(v, v_valid, cue_scale))
  return _reduce(s, cued, _normalised(t_weight, t_valid)[:, None], t_valid[:, None],
                 _normalised(v_weight, v_valid)[None], v_valid[None])


def pair_similarity(t: jax.Array, t_weight: jax.Array | None, t_mask: jax.Array, v: jax.Array,
                    v_mask: jax.Array, *, visual_cue: bool = False, cue_scale: float = 0.5,
                    v_weight: jax.Array | None = None) -> jax.Array:
  """(B,) similarity of text i with video i only (the diagonal of `token_wise_similarity`,
  without the off-diagonal work); same arguments with Bt = Bv = B."""
  t_valid, v_valid = t_mask > 0, v_mask > 0
  s = jnp.einsum("pwd,pkd->pwk", t, v, preferred_element_type=jnp.float32)
  cued = s
  if visual_cue:
    cued = s + jnp.einsum("pwj,pkj->pwk", s, frame_cue(v, v_valid, cue_scale))
  return _reduce(s, cued, _normalised(t_weight, t_valid), t_valid, _normalised(v_weight, v_valid),
                 v_valid)
