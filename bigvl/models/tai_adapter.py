"""The text-as-image multi-label adapter (arXiv 2312.04160) on a frozen M²-Encoder.

Texts and images share the towers' contrastive space, so a classifier trained on the embeddings of
sentences that mention labels can be applied to the embeddings of pictures that show them. The
adapter is a residual bottleneck on the un-normalised embedding (its norm is part of what the towers
say; the adapter starts as the identity, so at step 0 the model is the towers' zero-shot
classifier); label logits are the scaled cosine between the adapted embedding and each label's
prompt embedding, plus a bias (independent sigmoids). During training the text embedding is
perturbed (`perturb`) so that the adapter also fits the nearby points where image embeddings lie.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from bigvl.models import m2_encoder
from bigvl.models.layers.adapters import BottleneckAdapter
from bigvl.models.layers.init import param

NOISE = ("none", "gaussian", "relative")


@dataclasses.dataclass(frozen=True)
class TaIConfig:
  towers: m2_encoder.M2Config
  adapter_dim: int = 0              # bottleneck width (0: the embedding's)
  activation: str | None = "gelu"
  init_scale: float = 10.0          # exp(logit_scale) at init
  init_bias: float = -5.0


class TaIAdapter(nnx.Module):
  """`towers` (frozen M²-Encoder), `adapter`, `logit_scale`, `logit_bias`."""

  def __init__(self, cfg: TaIConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.towers.out_dim
    self.towers = m2_encoder.M2Encoder(cfg.towers, rngs=rngs)
    self.adapter = BottleneckAdapter(d, cfg.adapter_dim or d, activation=cfg.activation,
                                     rngs=rngs)
    self.logit_scale = param(jnp.asarray(math.log(cfg.init_scale), jnp.float32), ())
    self.logit_bias = param(jnp.asarray(cfg.init_bias, jnp.float32), ())

  def adapt(self, features: jax.Array) -> jax.Array:
    """Un-normalised embeddings (B, d) → adapted ones, unit norm."""
    return m2_encoder.l2_normalize(self.adapter(features.astype(jnp.float32)))

  def logits(self, features: jax.Array, label_embeddings: jax.Array) -> jax.Array:
    """(B, d) un-normalised embeddings, (C, d) unit label embeddings → (B, C) label logits."""
    z = self.adapt(features)
    return jnp.exp(self.logit_scale[...]) * z @ label_embeddings.T + self.logit_bias[...]


def perturb(features: jax.Array, rng: jax.Array, kind: str, std: float) -> jax.Array:
  """The embeddings with random noise: "gaussian" adds N(0, std²) per coordinate; "relative" adds
  noise of about std·‖x‖ (N(0, 1) per coordinate scaled by std·‖x‖/√d), the same share of every
  embedding's norm; "none" (or std 0) returns them unchanged."""
  if kind == "none" or std == 0:
    return features
  noise = jax.random.normal(rng, features.shape, jnp.float32)
  if kind == "gaussian":
    return features + std * noise
  if kind == "relative":
    norm = jnp.linalg.norm(features, axis=-1, keepdims=True)
    return features + std * norm / math.sqrt(features.shape[-1]) * noise
  raise ValueError(f"noise {kind!r}: use one of {NOISE}")


def label_embeddings(towers: m2_encoder.M2Encoder, ids: jax.Array, mask: jax.Array,
                     num_labels: int) -> jax.Array:
  """Each label's prompt embedding: the mean of its prompts' unit text embeddings, renormalised.
  ids, mask: (C * P, L), label-major (label c's prompts are rows c*P .. c*P + P - 1)."""
  z = towers.encode_text(ids, mask).reshape(num_labels, -1, towers.cfg.out_dim)
  return m2_encoder.l2_normalize(z.mean(axis=1))
