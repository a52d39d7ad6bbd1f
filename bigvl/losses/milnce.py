"""MIL-NCE (Miech et al., CVPR 2020) and SNP-S3's Local Vision-Word Matching (arXiv 2401.17773).

MIL-NCE, general form, on a (B, N) score matrix S with a positive mask P and a validity mask V
(entries outside V do not exist: padded words, clips, queue slots):
  loss_i = −log( Σ_{n∈P_i∩V_i} exp(S_in/τ) / Σ_{n∈V_i} exp(S_in/τ) )
         = LSE_{n∈V_i}(S_in/τ) − LSE_{n∈P_i∩V_i}(S_in/τ)
The denominator is the positives plus the negatives of the row (everything else that is valid), so
with one positive per row this is InfoNCE. A row with no valid positive has no loss: it is left out
of the mean and counted in aux["empty_rows"] (a flag, not an error: under jit the masks are values).
Masked entries get the finite logit _NEG (as in `ring.py`): exp() of it is 0, and every max, log
and gradient stays finite even for a row that is masked whole.

Symmetric form on a (B, B, K) tensor X, X_ijk = score of query item i with candidate k of item j
(video i × the k-th narration of text j); the positives of pair i are X_ii·:
  t→v / row direction: milnce over row i of X reshaped (B, B·K)
  v→t / column direction: milnce over row i of Xᵀ (X_jik: every item j against i's candidates)
  L = (L_row + L_col) / 2, each direction counting its positives once.
Miech's released loss (and AntMMF's `MILNCELoss`, which the SNP-S3 authors build on) instead takes
one log-sum-exp over the union of row i and column i, where the positives appear twice;
`milnce_union` is that form, kept for parity.

LVWM. A caption i brings W (= 3) significant-word features t_iw (valid where word_mask), a video j
brings C clip features v_jc (one mean-pooled token per clip; valid where clip_mask). The paper scores
each word against the clip features and combines with logsumexp; we take the log-sum-exp over every
valid (word, clip) pair, in similarity units so the score reads like a cosine:
  s_ij = τ · LSE_{w∈W_i, c∈C_j}(⟨t_iw, v_jc⟩ / τ)
With C = 1 (a pooled video feature) this is "each word against the video, logsumexp over words".
Because exp(s_ij/τ) = Σ_{w,c} exp(⟨t_iw, v_jc⟩/τ), InfoNCE on s with diagonal positives *is*
MIL-NCE with the bag of W·C (word, clip) instances of pair i as positives and every other pair's
instances as negatives: `lvwm_loss` = `milnce_symmetric` of s[..., None]. The features are used as
given (the model L2-normalises them, like `dense_contrastive_loss`).

Picking the words (`gather_words`): up to k positions where `significant` — the first k in caption
order, or a uniformly random k when an rng is given. Fewer than k significant words: the rest of the
k slots are masked out (never duplicated, never filled with arbitrary positions). No significant
word at all: the caption falls back to its `valid` tokens (e.g. non-pad, non-special), picked the same
way; only a caption with neither has an all-False mask, which the loss flags. The authors' fallback
for short captions reads positions that are not the caption's; here every unmasked slot is a position
of the candidate set by construction (`positions` is returned so tests can check it).

All whole-array jnp (no boolean indexing, no Python loop over B), so it runs under jit on batches
sharded over the mesh; XLA gathers the (B, C, d) clip side for the (B, B) scores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_F32 = jnp.float32
# Logit given to masked entries: exp() of it is 0, and unlike -inf it keeps every max/log finite.
_NEG = -1e30


def _check_temperature(temperature) -> None:
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise ValueError(f"temperature={temperature} must be > 0")


def _masked_lse(x: jax.Array, mask: jax.Array, axis) -> jax.Array:
  """log Σ exp(x) over `axis` where `mask`; _NEG-ish (finite) where the mask is empty."""
  return jax.nn.logsumexp(jnp.where(mask, x, _NEG), axis=axis)


def milnce(scores: jax.Array, positive_mask: jax.Array, temperature,
           valid_mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """MIL-NCE of the rows of `scores` (B, N): loss_i = LSE_{V_i}(S/τ) − LSE_{P_i∩V_i}(S/τ).

  Args:
    scores: (B, N) similarities (any float dtype; computed in float32).
    positive_mask: bool, broadcastable to (B, N): the bag of positives of each row.
    temperature: τ > 0 (a float or a scalar array).
    valid_mask: bool, broadcastable to (B, N), or None (all valid): entries that exist.
  Returns:
    (loss, aux): the mean over rows with a valid positive (0 when there is none); aux "empty_rows"
    (rows left out) and "acc" (rows whose best valid entry is a positive, over non-empty rows).
  """
  if scores.ndim != 2:
    raise ValueError(f"scores must be (B, N), got shape {scores.shape}")
  _check_temperature(temperature)
  logits = scores.astype(_F32) / temperature
  valid = jnp.ones(logits.shape, bool) if valid_mask is None else jnp.broadcast_to(
      valid_mask, logits.shape)
  pos = jnp.broadcast_to(positive_mask, logits.shape) & valid
  has_pos = jnp.any(pos, axis=1)
  per_row = _masked_lse(logits, valid, 1) - _masked_lse(logits, pos, 1)
  count = jnp.sum(has_pos.astype(_F32))
  loss = jnp.sum(jnp.where(has_pos, per_row, 0.0)) / jnp.maximum(count, 1.0)
  best = jnp.argmax(jnp.where(valid, logits, _NEG), axis=1)
  hit = jnp.take_along_axis(pos, best[:, None], axis=1)[:, 0] & has_pos
  aux = {"empty_rows": jnp.sum((~has_pos).astype(jnp.int32)),
         "acc": jnp.sum(hit.astype(_F32)) / jnp.maximum(count, 1.0)}
  return loss, aux


def _pair_tensor(scores: jax.Array, valid_mask: jax.Array | None):
  if scores.ndim != 3 or scores.shape[0] != scores.shape[1]:
    raise ValueError(f"scores must be (B, B, K), got shape {scores.shape}")
  valid = jnp.ones(scores.shape, bool) if valid_mask is None else jnp.broadcast_to(
      valid_mask, scores.shape)
  b, _, k = scores.shape
  pos = jnp.repeat(jnp.eye(b, dtype=bool), k, axis=1)                      # (B, B·K)
  return valid, pos, b, k


def milnce_symmetric(scores: jax.Array, temperature, valid_mask: jax.Array | None = None
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(MIL-NCE of the rows + MIL-NCE of the columns) / 2 of X (B, B, K), positives X_ii·.

  X_ijk scores item i against candidate k of item j; `valid_mask` (broadcastable to (B, B, K))
  marks the candidates that exist. aux: "loss_row", "loss_col", "acc_row", "acc_col",
  "empty_rows" (of the row direction).
  """
  valid, pos, b, k = _pair_tensor(scores, valid_mask)
  l_row, a_row = milnce(scores.reshape(b, b * k), pos, temperature, valid.reshape(b, b * k))
  cols = jnp.swapaxes(scores, 0, 1).reshape(b, b * k)
  l_col, a_col = milnce(cols, pos, temperature, jnp.swapaxes(valid, 0, 1).reshape(b, b * k))
  return 0.5 * (l_row + l_col), {"loss_row": l_row, "loss_col": l_col, "acc_row": a_row["acc"],
                                 "acc_col": a_col["acc"], "empty_rows": a_row["empty_rows"]}


def milnce_union(scores: jax.Array, temperature, valid_mask: jax.Array | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Miech's released MIL-NCE on X (B, B, K): loss_i = LSE(row i ∪ column i of X/τ) − LSE(X_ii·/τ),
  the union as concatenated there (the positives X_ii· appear in both halves). aux: "empty_rows"."""
  valid, pos, b, k = _pair_tensor(scores, valid_mask)
  rows, cols = scores.reshape(b, b * k), jnp.swapaxes(scores, 0, 1).reshape(b, b * k)
  vr, vc = valid.reshape(b, b * k), jnp.swapaxes(valid, 0, 1).reshape(b, b * k)
  both = jnp.concatenate([rows, cols], axis=1)
  valid_both = jnp.concatenate([vr, vc], axis=1)
  pos_both = jnp.concatenate([pos, jnp.zeros_like(pos)], axis=1)   # the positives once, on top
  return milnce(both, pos_both, temperature, valid_both)


# --------------------------------------------------------------------------- LVWM


def lvwm_scores(word_feats: jax.Array, word_mask: jax.Array, clip_feats: jax.Array,
                clip_mask: jax.Array | None, temperature) -> jax.Array:
  """s_ij = τ · LSE_{w∈W_i, c∈C_j}(⟨t_iw, v_jc⟩/τ) → (B, B), text i × video j.

  Args:
    word_feats: (B, W, d) significant-word features; word_mask: (B, W) bool.
    clip_feats: (B, C, d) clip features; clip_mask: (B, C) bool or None (all valid).
    temperature: τ > 0.
  A pair whose text has no valid word or whose video has no valid clip scores ≈ τ·_NEG (finite,
  exp() is 0); `lvwm_loss` masks those pairs out.
  """
  if word_feats.ndim != 3 or clip_feats.ndim != 3 or word_feats.shape[-1] != clip_feats.shape[-1]:
    raise ValueError(f"word_feats {word_feats.shape} and clip_feats {clip_feats.shape} must be "
                     f"(B, W, d) and (B, C, d) with the same d")
  if word_mask.shape != word_feats.shape[:2]:
    raise ValueError(f"word_mask {word_mask.shape} must be {word_feats.shape[:2]}")
  if clip_mask is None:
    clip_mask = jnp.ones(clip_feats.shape[:2], bool)
  elif clip_mask.shape != clip_feats.shape[:2]:
    raise ValueError(f"clip_mask {clip_mask.shape} must be {clip_feats.shape[:2]}")
  _check_temperature(temperature)
  sim = jnp.einsum("iwd,jcd->ijwc", word_feats, clip_feats, preferred_element_type=_F32)
  mask = word_mask[:, None, :, None] & clip_mask[None, :, None, :]
  return temperature * _masked_lse(sim / temperature, mask, (2, 3))


def lvwm_loss(word_feats: jax.Array, word_mask: jax.Array, clip_feats: jax.Array,
              clip_mask: jax.Array | None, temperature
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """MIL-NCE of `lvwm_scores` with diagonal positives, both directions (text→video rows,
  video→text columns), pairs without a valid word or clip left out.

  aux: "loss_t2v", "loss_v2t", "acc_t2v", "acc_v2t", "empty_rows" (captions with no valid word).
  """
  s = lvwm_scores(word_feats, word_mask, clip_feats, clip_mask, temperature)
  has_clip = (jnp.ones(clip_feats.shape[:2], bool) if clip_mask is None else clip_mask).any(1)
  pair_valid = word_mask.any(1)[:, None] & has_clip[None, :]
  loss, aux = milnce_symmetric(s[..., None], temperature, pair_valid[..., None])
  return loss, {"loss_t2v": aux["loss_row"], "loss_v2t": aux["loss_col"],
                "acc_t2v": aux["acc_row"], "acc_v2t": aux["acc_col"],
                "empty_rows": aux["empty_rows"]}


def gather_words(token_feats: jax.Array, significant: jax.Array, k: int = 3,
                 rng: jax.Array | None = None, valid: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Up to k significant-word features per caption → (feats (B, k, d), mask (B, k), positions).

  Args:
    token_feats: (B, L, d) text-encoder outputs.
    significant: (B, L) bool, the significant words (MSSM's vocabulary) of each caption.
    k: slots per caption (3 in SNP-S3); must be ≤ L.
    rng: None picks the first k candidates in caption order; a key picks k uniformly at random.
    valid: (B, L) bool or None: the fallback candidates of a caption with no significant word
      (its real tokens); None means no fallback. Significant words outside `valid` are dropped.
  Returns:
    feats (zero where masked), mask (slot holds a candidate), positions (B, k) int32 (the gathered
    position of each slot; where mask is False it is meaningless).
  """
  b, length = significant.shape
  if token_feats.shape[:2] != (b, length):
    raise ValueError(f"token_feats {token_feats.shape} and significant {significant.shape} "
                     f"must agree on (B, L)")
  if not 1 <= k <= length:
    raise ValueError(f"k={k} must be in [1, L={length}]")
  sig = significant.astype(bool)
  if valid is not None:
    if valid.shape != (b, length):
      raise ValueError(f"valid {valid.shape} must be {(b, length)}")
    sig = sig & valid
    cand = jnp.where(sig.any(1, keepdims=True), sig, valid.astype(bool))
  else:
    cand = sig
  if rng is None:   # earlier positions first: keys (L − pos)/(L + 1) ∈ (0, 1)
    key = jnp.broadcast_to((length - jnp.arange(length)) / (length + 1.0), (b, length))
  else:             # uniform in [0, 1): top-k of iid keys is a uniform k-subset
    key = jax.random.uniform(rng, (b, length))
  prio, positions = jax.lax.top_k(jnp.where(cand, key.astype(_F32), -1.0), k)
  mask = prio >= 0.0
  feats = jnp.take_along_axis(token_feats, positions[..., None], axis=1)
  feats = jnp.where(mask[..., None], feats, jnp.zeros((), feats.dtype))
  return feats, mask, positions.astype(jnp.int32)
