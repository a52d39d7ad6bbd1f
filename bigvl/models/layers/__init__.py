"""Layers shared by every model family; one idea per module, imported from the module itself.

  init        parameters with logical axis names; the factory protocols shared layers take
  factories   the plain linear / norm factories (`Linears`)
  norms       LayerNorm, RMSNorm (float32 statistics)
  attention   the attention kernel (`ATTENTION`, `check_attention`) and `Attention` (bidirectional,
              causal with a KV cache, cross; Sub-LN, rotary, grouped kv heads)
  rotary      rotary position embedding
  mlp         fc1 → activation (GELU, gated SwiGLU) → optional Sub-LN → fc2
  block       the pre-LN transformer block, optionally with cross-attention
  stack       running a list of layers: loop or `lax.scan`, optional remat (`REMAT_POLICIES`)
  adapters    bottleneck adapter and LoRA
  vit         patch embedding and a small ViT
"""
