"""The bigvl ⇄ PyTorch parameter map of M²-Encoder, as data.

One table (`entries`) pairs every bigvl parameter path with its key in the released PyTorch state
dict and a `Hook` that changes the tensor's layout. `to_torch` and `from_torch` both read that one
table, so the two directions cannot drift apart. NumPy only: neither JAX nor PyTorch is needed.

Released checkpoints hold more than bigvl creates. The reference's `VLMo` module builds these, and
none of them takes part in computing the image or text embeddings (`checkpoint_only`):

  backbone_vl.layers.{j}.….B.…, backbone_vl.layer_norm.B.*  the top stack's B branch; the top stack
                                                            runs its A weights for both modalities
  itc_image_proj.fc.weight, itc_text_proj.fc.weight         heads on the bottom-stack CLS
  logit_vl_scale                                            a second temperature
  backbone.vision_embed.mask_token                          masked-image pretraining only
  norm.{weight,bias}                                        a LayerNorm (eps 1e-6) it never calls
  pooler.dense.{weight,bias}                                a Linear + tanh pooler it never calls

Import keeps them as they are (`params_io` stores them beside the parameters), so that importing and
exporting again returns the file bit for bit. Exporting a model trained in bigvl, which has none of
them, fills them as each `CheckpointOnly.fill` says.

Dropped on import and never written: `visual_tokenizer.*`, the BEiT-2 image tokenizer that Lightning
training checkpoints carry for masked image modelling (the reference drops it as well).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import numpy as np

Path = tuple[str | int, ...]

DROPPED_PREFIXES = ("visual_tokenizer.",)


class ConversionError(ValueError):
  """A state dict or parameter tree that does not fit the map; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Hook:
  """How one tensor's layout differs between bigvl and PyTorch; `from_torch` inverts `to_torch`."""
  name: str
  to_torch: Callable[[np.ndarray], np.ndarray]
  from_torch: Callable[[np.ndarray], np.ndarray]

  def torch_shape(self, shape: Iterable[int]) -> tuple[int, ...]:
    # A zero-strided view costs nothing at any size and shows where the hook moves each axis.
    return tuple(self.to_torch(np.broadcast_to(np.zeros((), np.int8), tuple(shape))).shape)


COPY = Hook("copy", lambda x: x, lambda x: x)
# nnx.Linear kernel (in, out) ⇄ torch.nn.Linear weight (out, in).
LINEAR = Hook("linear", lambda k: k.T, lambda w: w.T)
# nnx.Conv kernel (kh, kw, in, out) ⇄ torch.nn.Conv2d weight (out, in, kh, kw).
CONV = Hook("conv", lambda k: k.transpose(3, 2, 0, 1), lambda w: w.transpose(2, 3, 1, 0))
# Both sides hold a 0-d tensor (`torch.ones([]) * log(1 / 0.07)` in the reference).
SCALAR = Hook("scalar", lambda s: s.reshape(()), lambda s: s.reshape(()))

# (bigvl path, PyTorch key, hook). Paths use "/" between levels.
_EMBEDDINGS = (
    ("backbone/text_embed/embedding", "backbone.text_embed.weight", COPY),
    ("backbone/vision_embed/proj/kernel", "backbone.vision_embed.proj.weight", CONV),
    ("backbone/vision_embed/proj/bias", "backbone.vision_embed.proj.bias", COPY),
    ("backbone/vision_embed/cls_token", "backbone.vision_embed.cls_token", COPY),
    ("backbone/encoder/embed_positions/A/embedding", "backbone.encoder.embed_positions.A.weight",
     COPY),
    ("backbone/encoder/embed_positions/B/embedding", "backbone.encoder.embed_positions.B.weight",
     COPY),
)
_HEADS = (
    ("itc_vl_image_proj/fc/kernel", "itc_vl_image_proj.fc.weight", LINEAR),
    ("itc_vl_text_proj/fc/kernel", "itc_vl_text_proj.fc.weight", LINEAR),
    ("logit_scale", "logit_scale", SCALAR),
)
# One Multiway layer, relative to `…/layers/{i}`, for branch {b}.
_LAYER = (
    ("self_attn/q_proj/{b}/kernel", "self_attn.q_proj.{b}.weight", LINEAR),
    ("self_attn/q_proj/{b}/bias", "self_attn.q_proj.{b}.bias", COPY),
    ("self_attn/k_proj/{b}/kernel", "self_attn.k_proj.{b}.weight", LINEAR),
    ("self_attn/k_proj/{b}/bias", "self_attn.k_proj.{b}.bias", COPY),
    ("self_attn/v_proj/{b}/kernel", "self_attn.v_proj.{b}.weight", LINEAR),
    ("self_attn/v_proj/{b}/bias", "self_attn.v_proj.{b}.bias", COPY),
    ("self_attn/out_proj/{b}/kernel", "self_attn.out_proj.{b}.weight", LINEAR),
    ("self_attn/out_proj/{b}/bias", "self_attn.out_proj.{b}.bias", COPY),
    ("self_attn/inner_attn_ln/{b}/scale", "self_attn.inner_attn_ln.{b}.weight", COPY),
    ("self_attn/inner_attn_ln/{b}/bias", "self_attn.inner_attn_ln.{b}.bias", COPY),
    ("self_attn_layer_norm/{b}/scale", "self_attn_layer_norm.{b}.weight", COPY),
    ("self_attn_layer_norm/{b}/bias", "self_attn_layer_norm.{b}.bias", COPY),
    ("ffn/{b}/fc1/kernel", "ffn.{b}.fc1.weight", LINEAR),
    ("ffn/{b}/fc1/bias", "ffn.{b}.fc1.bias", COPY),
    ("ffn/{b}/fc2/kernel", "ffn.{b}.fc2.weight", LINEAR),
    ("ffn/{b}/fc2/bias", "ffn.{b}.fc2.bias", COPY),
    ("ffn/{b}/ffn_layernorm/scale", "ffn.{b}.ffn_layernorm.weight", COPY),
    ("ffn/{b}/ffn_layernorm/bias", "ffn.{b}.ffn_layernorm.bias", COPY),
    ("final_layer_norm/{b}/scale", "final_layer_norm.{b}.weight", COPY),
    ("final_layer_norm/{b}/bias", "final_layer_norm.{b}.bias", COPY),
)
# A stack's final Multiway LayerNorm, relative to the stack.
_STACK_NORM = (
    ("layer_norm/{b}/scale", "layer_norm.{b}.weight", COPY),
    ("layer_norm/{b}/bias", "layer_norm.{b}.bias", COPY),
)
# (bigvl prefix, PyTorch prefix, branches bigvl creates); the depth comes from the model.
_BOTTOM = ("backbone/encoder", "backbone.encoder", ("A", "B"))
_TOP = ("backbone_vl", "backbone_vl", ("A",))


@dataclasses.dataclass(frozen=True)
class Entry:
  path: Path
  key: str
  hook: Hook


@dataclasses.dataclass(frozen=True)
class CheckpointOnly:
  """A released tensor bigvl never creates.

  `like` is a mapped key whose tensor has the same PyTorch shape. `fill` is what an export of a
  model trained in bigvl writes: "copy" (of `like`), "zeros" or "ones".
  """
  key: str
  like: str
  fill: str


# The top-stack B branch is written as a copy of A, so either branch gives the same result. The two
# bottom-CLS heads and the second temperature copy the ones bigvl trains, so that code reading them
# gets finite numbers of the trained scale. The rest get the reference's initial values (the pooler's
# zeros rather than its random init, to stay deterministic).
_OTHER_CHECKPOINT_ONLY = (
    CheckpointOnly("itc_image_proj.fc.weight", "itc_vl_image_proj.fc.weight", "copy"),
    CheckpointOnly("itc_text_proj.fc.weight", "itc_vl_text_proj.fc.weight", "copy"),
    CheckpointOnly("logit_vl_scale", "logit_scale", "copy"),
    CheckpointOnly("backbone.vision_embed.mask_token", "backbone.vision_embed.cls_token", "zeros"),
    CheckpointOnly("norm.weight", "backbone.encoder.layer_norm.A.weight", "ones"),
    CheckpointOnly("norm.bias", "backbone.encoder.layer_norm.A.bias", "zeros"),
    CheckpointOnly("pooler.dense.weight", "backbone.encoder.layers.0.self_attn.q_proj.A.weight",
                   "zeros"),
    CheckpointOnly("pooler.dense.bias", "backbone.encoder.layers.0.self_attn.q_proj.A.bias",
                   "zeros"),
)


def _parse(path: str) -> Path:
  return tuple(int(p) if p.isdigit() else p for p in path.split("/"))


def path_str(path: Path) -> str:
  return "/".join(str(p) for p in path)


def _stack_rows(stack: tuple[str, str, tuple[str, ...]], depth: int, branches: Iterable[str]):
  prefix, torch_prefix, _ = stack
  for b in branches:
    for i in range(depth):
      for path, key, hook in _LAYER:
        yield (f"{prefix}/layers/{i}/{path.format(b=b)}",
               f"{torch_prefix}.layers.{i}.{key.format(b=b)}", hook)
    for path, key, hook in _STACK_NORM:
      yield f"{prefix}/{path.format(b=b)}", f"{torch_prefix}.{key.format(b=b)}", hook


def entries(depth: int, vl_depth: int) -> tuple[Entry, ...]:
  """The map for a model with `depth` bottom and `vl_depth` top layers."""
  if depth < 1 or vl_depth < 1:
    raise ConversionError(f"the released layout has at least one layer per stack, got depth={depth}"
                          f", vl_depth={vl_depth}")
  rows = [*_EMBEDDINGS,
          *_stack_rows(_BOTTOM, depth, _BOTTOM[2]),
          *_stack_rows(_TOP, vl_depth, _TOP[2]),
          *_HEADS]
  return tuple(Entry(_parse(path), key, hook) for path, key, hook in rows)


def checkpoint_only(depth: int, vl_depth: int) -> tuple[CheckpointOnly, ...]:
  """The released tensors of such a model that bigvl does not create."""
  top_b = [CheckpointOnly(key, like, "copy") for (_, key, _), (_, like, _) in
           zip(_stack_rows(_TOP, vl_depth, ("B",)), _stack_rows(_TOP, vl_depth, ("A",)))]
  return (*top_b, *_OTHER_CHECKPOINT_ONLY)


def torch_keys(depth: int, vl_depth: int) -> list[str]:
  """Every key of the released state dict, in map order."""
  return ([e.key for e in entries(depth, vl_depth)] +
          [c.key for c in checkpoint_only(depth, vl_depth)])


# ------------------------------------------------------------------ trees


def _key(k: Any) -> str | int:
  # Orbax restores list indices as strings when no target tree is given.
  return int(k) if isinstance(k, str) and k.isdigit() else k


def flatten(tree: Mapping[Any, Any], prefix: Path = ()) -> dict[Path, Any]:
  out: dict[Path, Any] = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + (_key(k),)))
    else:
      out[prefix + (_key(k),)] = v
  return out


def unflatten(flat: Mapping[Path, Any]) -> dict[Any, Any]:
  tree: dict[Any, Any] = {}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return tree


def _check_names(got: set, want: set, what: str, show: Callable[[Any], str] = str) -> None:
  missing = sorted(want - got, key=show)
  unexpected = sorted(got - want, key=show)
  problems = []
  for label, names in (("missing", missing), ("unexpected", unexpected)):
    if names:
      listed = ", ".join(repr(show(n)) for n in names[:5])
      more = f" and {len(names) - 5} more" if len(names) > 5 else ""
      problems.append(f"{len(names)} {label} {what}(s): {listed}{more}")
  if problems:
    raise ConversionError("; ".join(problems))


def _contiguous(x: np.ndarray) -> np.ndarray:
  # Not np.ascontiguousarray: it turns a 0-d array into shape (1,).
  return x if x.flags.c_contiguous else x.copy(order="C")


def _fill(how: str, like: np.ndarray) -> np.ndarray:
  if how == "copy":
    return np.array(like, copy=True)
  if how == "zeros":
    return np.zeros_like(like)
  if how == "ones":
    return np.ones_like(like)
  raise ValueError(f"unknown fill {how!r}")


# ------------------------------------------------------------------ the two directions


def to_torch(params: Mapping[Any, Any], *, depth: int, vl_depth: int,
             extras: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
  """bigvl parameters (a pure dict) → a released-layout state dict of NumPy arrays.

  `extras` are checkpoint-only tensors kept by an earlier import; the others are filled.
  """
  table = entries(depth, vl_depth)
  flat = flatten(params)
  _check_names(set(flat), {e.path for e in table}, "bigvl parameter", path_str)
  out = {e.key: _contiguous(e.hook.to_torch(np.asarray(flat[e.path]))) for e in table}
  extras = dict(extras or {})
  for c in checkpoint_only(depth, vl_depth):
    like = out[c.like]
    if c.key in extras:
      value = np.asarray(extras.pop(c.key))
      if value.shape != like.shape:
        raise ConversionError(f"kept tensor {c.key!r} has shape {value.shape}; the model's "
                              f"{c.like!r} is {like.shape} and they must match")
    else:
      value = _fill(c.fill, like)
    out[c.key] = value
  if extras:
    raise ConversionError(f"kept tensor(s) {sorted(extras)[:5]} are not in the released layout")
  return out


def from_torch(state: Mapping[str, Any], *, depth: int, vl_depth: int,
               shapes: Mapping[Any, Any] | None = None
               ) -> tuple[dict[Any, Any], dict[str, np.ndarray]]:
  """A released-layout state dict → (bigvl parameters as a pure dict, checkpoint-only tensors).

  Every key must be there and nothing else may be (besides `DROPPED_PREFIXES`). With `shapes` (a
  tree like the parameters whose leaves have `.shape`), every tensor's shape is checked first and a
  mismatch names the PyTorch key. Dtypes are kept.
  """
  table = entries(depth, vl_depth)
  only = checkpoint_only(depth, vl_depth)
  state = {k: v for k, v in state.items() if not k.startswith(DROPPED_PREFIXES)}
  _check_names(set(state), {e.key for e in table} | {c.key for c in only}, "key")
  want = None
  if shapes is not None:
    want = {p: tuple(v.shape) for p, v in flatten(shapes).items()}
    _check_names(set(want), {e.path for e in table}, "model parameter in the map", path_str)

  params = {}
  for e in table:
    value = np.asarray(state[e.key])
    if want is not None:
      expected = e.hook.torch_shape(want[e.path])
      if value.shape != expected:
        raise ConversionError(f"{e.key!r} has shape {value.shape}; the model wants {expected} "
                              f"(bigvl {path_str(e.path)} {want[e.path]})")
    params[e.path] = _contiguous(e.hook.from_torch(value))
  extras = {}
  for c in only:
    value = np.asarray(state[c.key])
    expected = np.shape(state[c.like])
    if value.shape != expected:
      raise ConversionError(f"{c.key!r} has shape {value.shape}; it must match {c.like!r} "
                            f"{expected}")
    extras[c.key] = value
  return unflatten(params), extras
