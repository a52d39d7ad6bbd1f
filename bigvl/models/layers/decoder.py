"""A text decoder: token embedding, learned positions, causal blocks that cross-attend to a context
(image tokens), final norm, and an output head tied to the embedding (CoCa's captioner, SyCoCa's IC).

Decoding: `init_cache(batch, max_len)` gives every block's self-attention a KV cache; each later
call appends its tokens at the cache position and reads its positions from there
(`bigvl.models.layers.generate` runs the loop). Without a cache the decoder runs a whole sequence
causally (training, and the cache-free reference decoding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bigvl.models.layers.attention import Attention
from bigvl.models.layers.block import Block
from bigvl.models.layers.factories import Linears
from bigvl.models.layers.init import param, partitioned, trunc_normal
from bigvl.models.layers.mlp import MLP
from bigvl.models.layers.stack import run_layers
from bigvl.parallel.sharding import constrain


class TextDecoder(nnx.Module):
  """(B, L) token ids → (B, L, vocab) float32 logits, given a context (B, Lc, context_width)."""

  def __init__(self, *, vocab_size: int, width: int, depth: int, heads: int, mlp_dim: int,
               max_len: int, context_width: int, rngs: nnx.Rngs, init_std: float = 0.02,
               dtype=jnp.float32, param_dtype=jnp.float32, attention: str = "xla",
               remat: bool = False, remat_policy: str = "full", scan_layers: bool = False):
    make = Linears(rngs, dtype=dtype, param_dtype=param_dtype,
                   kernel_init=lambda gain: trunc_normal(init_std, gain))
    self.max_len, self.dtype = max_len, dtype
    self.remat, self.remat_policy, self.scan_layers = remat, remat_policy, scan_layers
    self.embed = nnx.Embed(vocab_size, width, dtype=dtype, param_dtype=param_dtype,
                           embedding_init=partitioned(trunc_normal(init_std), ("vocab", "embed")),
                           rngs=rngs)
    self.pos_embed = param(trunc_normal(init_std)(rngs.params(), (max_len, width), param_dtype),
                           ("position", "embed"))

    def attn(mode: str) -> Attention:
      return Attention(width, num_heads=heads, mode=mode, linear=make.linear, impl=attention,
                       kv_width=context_width if mode == "cross" else None)

    self.blocks = nnx.List([
        Block(width, attention=attn, mlp=lambda: MLP(width, mlp_dim, linear=make.linear),
              norm=make.norm, causal=True, cross=True)
        for _ in range(depth)])
    self.norm = make.norm(width)

  def init_cache(self, batch: int, max_len: int | None = None, dtype=None) -> None:
    max_len = max_len or self.max_len
    if max_len > self.max_len:
      raise ValueError(f"a cache of {max_len} tokens > the decoder's {self.max_len} positions")
    for block in self.blocks:
      block.self_attn.init_cache(batch, max_len, dtype or self.dtype)

  @property
  def decoding(self) -> bool:
    return self.blocks[0].self_attn.cached_key is not None

  def __call__(self, ids: jax.Array, *, context: jax.Array,
               context_mask: jax.Array | None = None) -> jax.Array:
    """ids (B, L) → logits (B, L, vocab) float32. context_mask: (B, Lc) bool, True on context
    tokens a query may see."""
    b, l = ids.shape
    if self.decoding:
      start = self.blocks[0].self_attn.cache_index[...]
      pos = jax.lax.dynamic_slice_in_dim(self.pos_embed[...], start, l)
    else:
      if l > self.max_len:
        raise ValueError(f"{l} tokens > the decoder's {self.max_len} positions")
      pos = self.pos_embed[...][:l]
    x = self.embed(ids) + pos[None].astype(self.dtype)
    x = constrain(x, ("batch", "length", "embed"))
    context = context.astype(self.dtype)

    def run(block: Block, x: jax.Array, context: jax.Array, mask: jax.Array | None) -> jax.Array:
      return block(x, context=context, context_mask=mask)

    # A scanned stack would have to thread the caches through the scan: decoding runs a loop.
    x = run_layers(self.blocks, x, run, context, context_mask, remat=self.remat and not self.decoding,
                   remat_policy=self.remat_policy, scan=self.scan_layers and not self.decoding)
    x = self.norm(x)
    # The head is the embedding, transposed (tied, as CoCa's), in float32: the logits feed a softmax.
    return x.astype(jnp.float32) @ self.embed.embedding[...].astype(jnp.float32).T
