"""Masked language modelling: which tokens are masked and what they become (BERT's 80/10/10), on the
device, and the loss over them.

`mask_tokens` draws, per row, `max(1, round(ratio · real tokens))` positions among the row's
`candidates` (fewer when the row has fewer candidates), uniformly (top-k of iid keys, so no Python
loop and a fixed shape under jit). Each drawn position becomes, independently:
  [MASK]            with probability p_mask (0.8)
  a variant         with probability p_variant (0.1): one of `variants[id]`'s first
                    `variant_counts[id]` ids, uniformly; an id without variants takes one of the
                    `fallback` ids instead (BERT's "random token", from the same pool as the
                    candidates: the vocabulary, or SNP-S3's significant-word pieces)
  itself            otherwise (0.1)
Targets are the original ids at the drawn positions. The same key gives the same masking: a
resumed run draws exactly what the uninterrupted one did.

SNP-S3's MSSM is this with `candidates` = the pieces of a caption's significant words and variants
from the same lemma or word class (`bigvl.data.significant`); plain MLM (the baseline) is this with
`candidates` = every real non-special token and the vocabulary as fallback.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bigvl.losses import token_ce

MASK, VARIANT, KEEP = 0, 1, 2


def mask_tokens(rng: jax.Array, ids: jax.Array, real: jax.Array, candidates: jax.Array, *,
                mask_id: int, ratio: float, variants: jax.Array, variant_counts: jax.Array,
                fallback: jax.Array, p_mask: float = 0.8, p_variant: float = 0.1
                ) -> dict[str, jax.Array]:
  """ids, real, candidates (B, L) → {"ids": the masked input, "targets": the original ids,
  "selected": (B, L) bool (positions the loss scores), "action": (B, L) int32 MASK / VARIANT /
  KEEP at selected positions, -1 elsewhere}.

  variants (V, K) int32 (rows padded with anything), variant_counts (V,) int32, fallback (F,)
  int32 with F >= 1.
  """
  if not 0 < ratio <= 1:
    raise ValueError(f"ratio={ratio}: in (0, 1]")
  if not (0 <= p_mask and 0 <= p_variant and p_mask + p_variant <= 1):
    raise ValueError(f"p_mask={p_mask}, p_variant={p_variant}: probabilities summing to <= 1")
  k_pick, k_act, k_var, k_fb = jax.random.split(rng, 4)
  b, n = ids.shape
  cand = candidates.astype(bool) & real.astype(bool)
  count = jnp.maximum(jnp.round(ratio * jnp.sum(real, axis=1)), 1).astype(jnp.int32)   # (B,)
  keys = jnp.where(cand, jax.random.uniform(k_pick, (b, n)), -1.0)
  # rank of each position's key within its row (0 = largest); selected: the top `count`.
  order = jnp.argsort(-keys, axis=1)
  rank = jnp.argsort(order, axis=1)
  selected = cand & (rank < count[:, None])
  u = jax.random.uniform(k_act, (b, n))
  action = jnp.where(u < p_mask, MASK, jnp.where(u < p_mask + p_variant, VARIANT, KEEP))
  have = variant_counts[ids]                                                        # (B, L)
  pick = jnp.floor(jax.random.uniform(k_var, (b, n)) * jnp.maximum(have, 1)).astype(jnp.int32)
  variant = jnp.take_along_axis(variants[ids], pick[..., None], axis=-1)[..., 0]
  fb = fallback[jax.random.randint(k_fb, (b, n), 0, fallback.shape[0])]
  variant = jnp.where(have > 0, variant, fb)
  new = jnp.where(action == MASK, mask_id, jnp.where(action == VARIANT, variant, ids))
  return {"ids": jnp.where(selected, new, ids).astype(ids.dtype), "targets": ids,
          "selected": selected, "action": jnp.where(selected, action, -1).astype(jnp.int32)}


def mlm_loss(logits: jax.Array, targets: jax.Array, selected: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy over the selected positions of the batch (0 when none) and the accuracy
  there."""
  nll, count, correct = token_ce.token_cross_entropy(logits, targets, selected)
  total = jnp.maximum(jnp.sum(count), 1.0)
  return jnp.sum(nll) / total, {"acc": jnp.sum(correct) / total, "tokens": jnp.sum(count)}
