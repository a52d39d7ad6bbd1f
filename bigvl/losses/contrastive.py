"""Exact, dense symmetric InfoNCE over the global batch.

This is the straightforward version: every device sees the full B×B logits (XLA all-gathers the
embeddings when the batch is sharded). It is the test oracle for the sharded ring loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dense_contrastive_loss(zimg: jax.Array, ztxt: jax.Array, logit_scale: jax.Array
                           ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean of image→text and text→image cross-entropy; pair i is the positive of row/column i.

  Args:
    zimg: (B, d) image embeddings (L2-normalised by the model).
    ztxt: (B, d) text embeddings.
    logit_scale: scalar; the logits are exp(logit_scale) · zimg @ ztxtᵀ.
  Returns:
    (loss, metrics) with float32 loss and batch accuracies of both directions.
  """
  zimg = zimg.astype(jnp.float32)
  ztxt = ztxt.astype(jnp.float32)
  logits = jnp.exp(logit_scale.astype(jnp.float32)) * (zimg @ ztxt.T)
  diag = jnp.diagonal(logits)
  loss_i2t = jnp.mean(jax.nn.logsumexp(logits, axis=1) - diag)
  loss_t2i = jnp.mean(jax.nn.logsumexp(logits, axis=0) - diag)
  labels = jnp.arange(logits.shape[0])
  metrics = {
      "loss_i2t": loss_i2t,
      "loss_t2i": loss_t2i,
      "acc_i2t": jnp.mean(jnp.argmax(logits, axis=1) == labels),
      "acc_t2i": jnp.mean(jnp.argmax(logits, axis=0) == labels),
  }
  return 0.5 * (loss_i2t + loss_t2i), metrics
