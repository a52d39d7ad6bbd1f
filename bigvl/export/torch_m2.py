"""A PyTorch M²-Encoder in the released checkpoint layout, and the reading of released checkpoints.

Needs only PyTorch, safetensors and sentencepiece (no JAX): a directory written by
`launch/export_torch.py` is used as

  model, tokenizer = torch_m2.load_exported("OUT")
  ids, mask = tokenizer.encode_batch(["a red circle", "红色的圆形"])
  txt = model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask))
  img = model.encode_image(images)          # (B, 3, H, W), RGB scaled to [-1, 1]
  probs = model.zero_shot_probs(img, txt)

Module names give exactly the released state-dict keys (`docs/m2_encoder.md` and `name_map`), so
`load_state_dict(..., strict=True)` accepts a released checkpoint. That includes the weights no
embedding uses (top-stack B branch, bottom-CLS heads, `logit_vl_scale`, `mask_token`, `norm`,
`pooler`); they are created and loaded, never run.

The numerics follow bigvl (`bigvl/models/m2_encoder.py`), which follows the reference: pre-LN with
Sub-LN, exact GELU, LayerNorm eps 1e-5, q scaled after its bias, float32 softmax, positions from
row 2, padded tokens zeroed before each stack and masked as keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

# Padded keys get the most negative float32 as bigvl does, not -inf: the same whenever a row has a
# real key ([CLS] always is one), and finite otherwise.
MASK_VALUE = torch.finfo(torch.float32).min
NESTING_KEYS = ("state_dict", "module", "model")     # tried in this order, as the reference does
DEEPSPEED_PREFIX = "_forward_module."
VISION_POSITIONS_KEY = "backbone.encoder.embed_positions.A.weight"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class M2Config:
  """Sizes of an M²-Encoder; the same fields as bigvl's `M2Config` without its runtime choices."""
  width: int
  heads: int
  depth: int
  vl_depth: int
  mlp_dim: int
  out_dim: int
  patch_size: int
  image_size: int
  vocab_size: int
  text_positions: int
  ln_eps: float = 1e-5

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> M2Config:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown M2Config field(s) {unknown}")
    return cls(**d)

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def vision_positions(self) -> int:
    return self.num_patches + 3


# ------------------------------------------------------------------ the model


class Multiway(nn.Module):
  """Branch A (vision) and branch B (text) of one sub-module; the caller names the branch."""

  def __init__(self, make: Callable[[], nn.Module]):
    super().__init__()
    self.A = make()
    self.B = make()

  def forward(self, x: torch.Tensor, branch: str) -> torch.Tensor:
    return getattr(self, branch)(x)


class MultiheadAttention(nn.Module):

  def __init__(self, cfg: M2Config):
    super().__init__()
    d = cfg.width
    self.num_heads = cfg.heads
    self.head_dim = d // cfg.heads
    self.q_proj = Multiway(lambda: nn.Linear(d, d))
    self.k_proj = Multiway(lambda: nn.Linear(d, d))
    self.v_proj = Multiway(lambda: nn.Linear(d, d))
    self.out_proj = Multiway(lambda: nn.Linear(d, d))
    self.inner_attn_ln = Multiway(lambda: nn.LayerNorm(d, eps=cfg.ln_eps))

  def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, branch: str) -> torch.Tensor:
    b, l, d = x.shape
    heads = lambda t: t.view(b, l, self.num_heads, self.head_dim).transpose(1, 2)
    q = heads(self.q_proj(x, branch) * self.head_dim ** -0.5)
    k = heads(self.k_proj(x, branch))
    v = heads(self.v_proj(x, branch))
    logits = torch.matmul(q, k.transpose(-1, -2)).float()
    if key_mask is not None:
      logits = logits.masked_fill(~key_mask[:, None, None, :], MASK_VALUE)
    probs = torch.softmax(logits, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(b, l, d)
    return self.out_proj(self.inner_attn_ln(out, branch), branch)


class FeedForwardNetwork(nn.Module):

  def __init__(self, cfg: M2Config):
    super().__init__()
    self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
    self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)
    self.ffn_layernorm = nn.LayerNorm(cfg.mlp_dim, eps=cfg.ln_eps)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(self.ffn_layernorm(F.gelu(self.fc1(x))))


class EncoderLayer(nn.Module):

  def __init__(self, cfg: M2Config):
    super().__init__()
    self.self_attn = MultiheadAttention(cfg)
    self.self_attn_layer_norm = Multiway(lambda: nn.LayerNorm(cfg.width, eps=cfg.ln_eps))
    self.ffn = Multiway(lambda: FeedForwardNetwork(cfg))
    self.final_layer_norm = Multiway(lambda: nn.LayerNorm(cfg.width, eps=cfg.ln_eps))

  def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, branch: str) -> torch.Tensor:
    x = x + self.self_attn(self.self_attn_layer_norm(x, branch), key_mask, branch)
    return x + self.ffn(self.final_layer_norm(x, branch), branch)


class Encoder(nn.Module):
  """Layers and a final Multiway LayerNorm; the bottom stack also owns the position tables."""

  def __init__(self, cfg: M2Config, num_layers: int, with_positions: bool):
    super().__init__()
    self.embed_positions = None
    if with_positions:
      self.embed_positions = nn.Module()
      self.embed_positions.A = nn.Embedding(cfg.vision_positions, cfg.width)
      self.embed_positions.B = nn.Embedding(cfg.text_positions, cfg.width)
    self.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(num_layers)])
    self.layer_norm = Multiway(lambda: nn.LayerNorm(cfg.width, eps=cfg.ln_eps))

  def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, branch: str) -> torch.Tensor:
    if self.embed_positions is not None:
      # Row 2 is the first position (fairseq's convention, kept by the reference).
      positions = torch.arange(2, x.shape[1] + 2, device=x.device)
      x = x + getattr(self.embed_positions, branch)(positions)[None].to(x.dtype)
    if key_mask is not None:
      x = x * key_mask[..., None].to(x.dtype)
    for layer in self.layers:
      x = layer(x, key_mask, branch)
    return self.layer_norm(x, branch)


class VisionEmbedding(nn.Module):

  def __init__(self, cfg: M2Config):
    super().__init__()
    self.image_size = cfg.image_size
    self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
    self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.width))  # masked-image pretraining only

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    b, _, h, w = images.shape
    if (h, w) != (self.image_size, self.image_size):
      raise ValueError(f"images are {h}x{w}, the model expects {self.image_size}x{self.image_size}")
    x = self.proj(images).flatten(2).transpose(1, 2)
    return torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)


class BEiT3(nn.Module):
  """The bottom stack and both embeddings (`backbone.*`)."""

  def __init__(self, cfg: M2Config):
    super().__init__()
    self.text_embed = nn.Embedding(cfg.vocab_size, cfg.width)
    self.vision_embed = VisionEmbedding(cfg)
    self.encoder = Encoder(cfg, cfg.depth, with_positions=True)


class ITCHead(nn.Module):

  def __init__(self, width: int, out_dim: int):
    super().__init__()
    self.fc = nn.Linear(width, out_dim, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc(x)


class Pooler(nn.Module):
  """Present in released checkpoints; no embedding uses it."""

  def __init__(self, width: int):
    super().__init__()
    self.dense = nn.Linear(width, width)


class M2Encoder(nn.Module):
  """The two-tower M²-Encoder: images through the A weights, text through B, then the shared top."""

  def __init__(self, cfg: M2Config):
    super().__init__()
    self.cfg = cfg
    self.backbone = BEiT3(cfg)
    self.backbone_vl = Encoder(cfg, cfg.vl_depth, with_positions=False)
    self.norm = nn.LayerNorm(cfg.width, eps=1e-6)          # unused, as in the reference
    self.pooler = Pooler(cfg.width)                         # unused, as in the reference
    self.itc_image_proj = ITCHead(cfg.width, cfg.out_dim)    # bottom-CLS heads: unused here
    self.itc_text_proj = ITCHead(cfg.width, cfg.out_dim)
    self.itc_vl_image_proj = ITCHead(cfg.width, cfg.out_dim)
    self.itc_vl_text_proj = ITCHead(cfg.width, cfg.out_dim)
    self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    self.logit_vl_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

  def encode_image(self, images: torch.Tensor) -> torch.Tensor:
    """images: (B, 3, H, W) scaled to [-1, 1] → (B, out_dim), unit norm."""
    x = self.backbone.vision_embed(images)
    x = self.backbone.encoder(x, None, "A")
    x = self.backbone_vl(x, None, "A")
    return F.normalize(self.itc_vl_image_proj(x[:, 0]), dim=-1)

  def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ids, mask: (B, L), mask 1 on real tokens, ids[:, 0] = [CLS] → (B, out_dim), unit norm."""
    if ids.shape[1] > self.cfg.text_positions - 2:
      raise ValueError(f"text length {ids.shape[1]} > {self.cfg.text_positions - 2} positions")
    key_mask = mask.bool()
    x = self.backbone.text_embed(ids.long())
    x = self.backbone.encoder(x, key_mask, "B")
    x = self.backbone_vl(x, key_mask, "A")
    return F.normalize(self.itc_vl_text_proj(x[:, 0]), dim=-1)

  def logits(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    return self.logit_scale.exp() * image_emb @ text_emb.T

  def zero_shot_probs(self, image_emb: torch.Tensor, label_emb: torch.Tensor) -> torch.Tensor:
    """Softmax over the labels for each image, as the reference's demo computes it."""
    return self.logits(image_emb, label_emb).softmax(dim=-1)


def build(cfg: M2Config, state: Mapping[str, torch.Tensor] | None = None) -> M2Encoder:
  """The model in eval mode; with `state`, loaded strictly without a random init first."""
  if state is None:
    return M2Encoder(cfg).eval()
  with torch.device("meta"):
    model = M2Encoder(cfg)
  model.load_state_dict(state, strict=True, assign=True)
  return model.eval()


# ------------------------------------------------------------------ exported directories


def read_config(directory: str) -> dict[str, Any]:
  with open(os.path.join(directory, CONFIG_FILE)) as f:
    return json.load(f)


def load_exported(directory: str):
  """(model, tokenizer) from a directory written by `launch/export_torch.py`."""
  from bigvl.tokenizers import glm   # sentencepiece and numpy only

  doc = read_config(directory)
  cfg = M2Config.from_dict(doc["model"])
  model = build(cfg, load_safetensors(os.path.join(directory, WEIGHTS_FILE)))
  tok = doc["tokenizer"]
  tokenizer = glm.GLMTokenizer(os.path.join(directory, tok["file"]), max_len=tok["max_len"],
                               lowercase=tok["lowercase"])
  return model, tokenizer


# ------------------------------------------------------------------ released checkpoint files


class UnsafeCheckpointError(ValueError):
  """A checkpoint file that needs arbitrary code to unpickle; it is never executed."""


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
  """The tensors of a .safetensors file; a broken one (its 8-byte header length or its JSON
  header garbage, or the file cut short) is a ValueError naming it."""
  import safetensors
  import safetensors.torch
  try:
    return safetensors.torch.load_file(path)
  except safetensors.SafetensorError as e:
    raise ValueError(f"{path}: not a readable .safetensors file ({e}): is it complete? Write or "
                     f"copy it again") from e


def load_file(path: str) -> Any:
  """The object stored in `path`: .safetensors directly, anything else through the restricted
  unpickler (`weights_only=True`), which builds only tensors and plain containers."""
  if path.endswith(".safetensors"):
    return load_safetensors(path)
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except (RuntimeError, EOFError, KeyError, OSError) as e:   # cut short, empty, or text
    if isinstance(e, OSError) and e.filename:                # missing or unreadable: as it is
      raise
    first = str(e).split(". ")[0][:200] if str(e) else type(e).__name__
    raise ValueError(f"{path}: not a readable PyTorch checkpoint ({first}): is it complete?") from e
  except pickle.UnpicklingError as e:
    raise UnsafeCheckpointError(
        f"{path}: refused, the file holds objects that only arbitrary code could build (nothing "
        f"was run). If you trust it, extract its state dict elsewhere and save it as .safetensors. "
        f"PyTorch said: {str(e).splitlines()[0]}") from e


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
  """The flat state dict inside a loaded checkpoint.

  Accepts a raw state dict, one nested under `state_dict` (Lightning), `module` (DeepSpeed) or
  `model`, and keys prefixed with `_forward_module.` (DeepSpeed under Lightning).
  """
  if not isinstance(obj, Mapping):
    raise ValueError(f"a checkpoint must hold a dict, got {type(obj).__name__}")
  for key in NESTING_KEYS:
    if isinstance(obj.get(key), Mapping):
      obj = obj[key]
      break
  state = {}
  for key, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor; "
                       f"top-level keys: {sorted(obj)[:8]}")
    name = key[len(DEEPSPEED_PREFIX):] if key.startswith(DEEPSPEED_PREFIX) else key
    if name in state:
      raise ValueError(f"checkpoint has {name!r} both with and without {DEEPSPEED_PREFIX!r}")
    state[name] = value
  return state


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
  return unwrap_state_dict(load_file(path))


def resize_vision_positions(table: torch.Tensor, rows: int) -> torch.Tensor:
  """The vision position table for another image size, as the reference's loader builds it.

  The first 3 rows (2 unused offset rows and CLS) are kept; the patch rows, a square grid, are
  resized with area interpolation computed in float32. (When shrinking, the reference's Lightning
  path cuts rows off instead, dropping whole grid rows; its DeepSpeed path interpolates, as here.)
  """
  if table.shape[0] == rows:
    return table
  old, new = table.shape[0] - 3, rows - 3
  side, new_side = math.isqrt(old), math.isqrt(new)
  if side * side != old or new_side * new_side != new:
    raise ValueError(f"{VISION_POSITIONS_KEY}: cannot resize {table.shape[0]} rows to {rows}; the "
                     f"patch rows ({old} → {new}) must form square grids")
  dim = table.shape[1]
  grid = table[3:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
  grid = F.interpolate(grid, size=(new_side, new_side), mode="area")
  patches = grid.permute(0, 2, 3, 1).reshape(new, dim).to(table.dtype)
  return torch.cat([table[:3], patches], dim=0)
