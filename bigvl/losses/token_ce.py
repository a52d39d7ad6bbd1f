"""Token cross-entropy for language-model heads (captioning, LLM decoders).

Per example it returns the summed negative log-likelihood and the number of target tokens, so that
the batch loss (sum over tokens / tokens in the batch) can be formed across micro-batches and
shards without weighting short captions up (GradCache sums the rows of the whole batch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(logits: jax.Array, targets: jax.Array,
                        mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """logits (B, L, V), targets (B, L) int, mask (B, L) (1 on target tokens) → per example:
  (summed NLL (B,), target tokens (B,), correctly predicted tokens (B,)), float32."""
  logits = logits.astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  nll = (logz - picked) * mask
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * mask
  return nll.sum(-1), mask.sum(-1), correct.sum(-1)
