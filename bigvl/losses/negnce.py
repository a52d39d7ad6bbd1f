"""Contrastive losses written on a (B, B) similarity matrix: NegNCE (arXiv 2309.11082) and the plain
symmetric InfoNCE it is compared with.

Row i of S is query i (a text), column j a key (a video); the positive of row i is S_ii. These take
the matrix, not embeddings, because DMAE's token-wise similarity is not a dot product of two
vectors (`bigvl.losses.ring_pairwise` builds S round the ring). Everything is whole-matrix jnp —
no boolean indexing, no Python loop over B — so it runs under jit on an S sharded by columns:
row reductions become all-reduces of B-vectors.

NegNCE, as the authors' `NegNCE` module (AntMMF prj/dmae_vtp, dmae_utils.py):
  p_ij = clamp(softmax_j(scale·S_ij), 1e-6, 1 − 1e-6)
  H = {(i, j), i ≠ j : relu(S_ij − S_ii + margin) + relu(S_ij − S_jj + margin) > 0}
      (a negative that beats the positive of its row or of its column)
  L = w_pos · mean_i(−log p_ii) + w_neg · mean_{(i,j)∈H}(−log(1 − p_ij)),  0 for the second term
      when H is empty.
The clamp makes a saturated probability's gradient zero, as theirs does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EPS = 1e-6


def hard_negatives(s: jax.Array, margin: float = 0.0) -> jax.Array:
  """Bool (B, B): the NegNCE hard set H of `s` (off-diagonal entries above the positive of their
  row or of their column, by `margin`)."""
  d = jnp.diagonal(s)
  over = jax.nn.relu(s - d[:, None] + margin) + jax.nn.relu(s - d[None, :] + margin)
  off = ~jnp.eye(s.shape[0], s.shape[1], dtype=bool)
  return (over > 0) & off


def negnce(s: jax.Array, *, scale: float = 100.0, w_pos: float = 1.0, w_neg: float = 0.5,
           margin: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """NegNCE of the rows of `s` (B, B), positives on the diagonal → (loss, aux).

  aux: "loss_pos", "loss_neg" (the two unweighted terms) and "hard_fraction" (|H| / (B(B−1))).
  """
  s = s.astype(jnp.float32)
  b = s.shape[0]
  p = jnp.clip(jax.nn.softmax(scale * s, axis=1), EPS, 1.0 - EPS)
  loss_pos = jnp.mean(-jnp.log(jnp.diagonal(p)))
  hard = hard_negatives(s, margin)
  count = jnp.sum(hard.astype(jnp.float32))
  neg = jnp.where(hard, -jnp.log(1.0 - p), 0.0)
  loss_neg = jnp.sum(neg) / jnp.maximum(count, 1.0)     # 0 when H is empty
  loss = w_pos * loss_pos + w_neg * loss_neg
  aux = {"loss_pos": loss_pos, "loss_neg": loss_neg,
         "hard_fraction": count / max(b * (b - 1), 1)}
  return loss, aux


def negnce_symmetric(s: jax.Array, *, scale: float = 100.0, w_pos: float = 1.0,
                     w_neg: float = 0.5, margin: float = 0.0
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(NegNCE(S) + NegNCE(Sᵀ)) / 2: text→video rows and video→text columns, as the authors train.

  aux: "loss_t2v", "loss_v2t" and "hard_fraction" (the same for S and Sᵀ: H(Sᵀ) = H(S)ᵀ).
  """
  kw = dict(scale=scale, w_pos=w_pos, w_neg=w_neg, margin=margin)
  l_t2v, a_t2v = negnce(s, **kw)
  l_v2t, _ = negnce(s.T, **kw)
  return 0.5 * (l_t2v + l_v2t), {"loss_t2v": l_t2v, "loss_v2t": l_v2t,
                                 "hard_fraction": a_t2v["hard_fraction"]}


def infonce_symmetric(s: jax.Array, scale: float = 100.0
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean of the row and column cross-entropies of scale·S with the diagonal as targets (the
  authors' `CrossEn` on S and Sᵀ): `dense_contrastive_loss` for a matrix that is not zimg @ ztxtᵀ.
  """
  logits = scale * s.astype(jnp.float32)
  d = jnp.diagonal(logits)
  l_t2v = jnp.mean(jax.nn.logsumexp(logits, axis=1) - d)
  l_v2t = jnp.mean(jax.nn.logsumexp(logits, axis=0) - d)
  return 0.5 * (l_t2v + l_v2t), {"loss_t2v": l_t2v, "loss_v2t": l_v2t}
