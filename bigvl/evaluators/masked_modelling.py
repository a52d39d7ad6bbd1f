"""Evaluations of text-guided masked image modelling and of the patches a model picks.

`tgmim`: the masked patches' reconstruction error with each picture's own caption over the error
with another picture's caption (`tgmim/true_vs_shuffled` < 1: the text helps rebuild the picture).
`attn_mask`: the IoU of the patches the model's masking rule picks with the patches the objects
cover (the embedded world emits object masks), beside the IoU of as many random patches.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from bigvl.evaluators import common

# A patch belongs to the objects when they cover at least this share of its pixels.
OBJECT_COVER = 0.25


def _world(name: str, entry: Mapping[str, Any], image_size: int, world_dir: str):
  from bigvl.evaluators import sources
  _world_only(name, entry)
  return sources.world(world_dir, entry.get("split", "eval_heldout"), image_size,
                       entry.get("max_examples", 0))


def _texts(tokenizer, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  return common.as_written(tokenizer).encode_batch(list(captions))


class _WorldKind:
  """A kind with no keys of its own that reads the embedded world."""

  @classmethod
  def config_keys(cls) -> dict[str, Any]:
    return {}

  @classmethod
  def validate_config(cls, name: str, entry: Mapping[str, Any]) -> None:
    _world_only(name, entry)


def _world_only(name: str, entry: Mapping[str, Any]) -> None:
  if entry.get("source", "world") not in ("world", ""):
    raise ValueError(f"evals.{name}.source={entry.get('source')!r}: this kind reads the embedded "
                     "world (source='world'), which knows its pictures' objects")


class TGMIMEvaluator(_WorldKind):
  """Logs `{prefix}/true_vs_shuffled` (pooled over languages), `{prefix}/{lang}/true_vs_shuffled`,
  and the two mean errors `{prefix}/error_true`, `{prefix}/error_shuffled`."""

  requires = ("tgmim_error",)

  @classmethod
  def from_config(cls, name, entry, *, tokenizer, image_size, world_dir=""):
    data, _ = _world(name, entry, image_size, world_dir)
    return cls(images=data.images, captions=data.captions, tokenizer=tokenizer, prefix=name,
               every=entry.get("every", 0), batch_size=entry.get("batch_size"))

  def __init__(self, *, images: common.Rows, captions: Sequence[Sequence[tuple[str, str]]],
               tokenizer, prefix: str = "tgmim", every: int = 0, batch_size: int | None = None):
    self.images, self.prefix, self.every, self.batch_size = images, prefix, every, batch_size
    n = len(images)
    # Another picture's caption for each: a random permutation, rolled so no picture keeps its own.
    perm = np.random.default_rng(0).permutation(n)
    self.other = np.empty(n, np.int64)
    self.other[perm] = np.roll(perm, n // 2)
    self.texts = {}
    for lang in sorted({lang for caps in captions for lang, _ in caps}):
      own = [next((c for l, c in caps if l == lang), None) for caps in captions]
      if any(c is None for c in own):
        continue
      self.texts[lang] = _texts(tokenizer, own)

  def run(self, predictor: common.Predictor) -> dict[str, float]:
    out, true_all, shuf_all = {}, [], []
    for lang, (ids, mask) in self.texts.items():
      errs = {}
      for kind, ctx in (("true", np.arange(len(ids))), ("shuffled", self.other)):
        rows = common.Rows(len(ids), lambda i, ctx=ctx: {
            **self.images.load(i), "text": ids[i], "text_mask": mask[i],
            "ctx_text": ids[ctx[i]], "ctx_text_mask": mask[ctx[i]]})
        errs[kind] = predictor.run("tgmim_error", rows, self.batch_size)["error"]
      out[f"{self.prefix}/{lang}/true_vs_shuffled"] = float(errs["true"].mean()
                                                             / errs["shuffled"].mean())
      true_all.append(errs["true"])
      shuf_all.append(errs["shuffled"])
    t, s = np.concatenate(true_all).mean(), np.concatenate(shuf_all).mean()
    out.update({f"{self.prefix}/true_vs_shuffled": float(t / s),
                f"{self.prefix}/error_true": float(t), f"{self.prefix}/error_shuffled": float(s)})
    return out


def object_patches(mask: np.ndarray, grid: int) -> np.ndarray:
  """(H, W) bool object mask → (grid·grid,) bool: the patches the objects cover enough of."""
  h, w = mask.shape
  cover = mask.reshape(grid, h // grid, grid, w // grid).mean(axis=(1, 3))
  return (cover >= OBJECT_COVER).reshape(-1)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Row-wise IoU of two (n, N) bool arrays."""
  inter = (a & b).sum(-1)
  union = np.maximum((a | b).sum(-1), 1)
  return inter / union


class PatchSelectionEvaluator(_WorldKind):
  """Logs `{prefix}/iou` of the model's chosen patches with the object patches, and
  `{prefix}/iou_random` of as many patches drawn at random (seed 0) per picture."""

  requires = ("select_patches",)

  @classmethod
  def from_config(cls, name, entry, *, tokenizer, image_size, world_dir=""):
    data, metas = _world(name, entry, image_size, world_dir)
    if not all("object_mask" in m for m in metas):
      raise ValueError(f"evals.{name}: the world's records carry no object masks: rebuild it")
    masks = [_unpack(m["object_mask"]) for m in metas]
    return cls(images=data.images, captions=data.captions, masks=masks, tokenizer=tokenizer,
               prefix=name, every=entry.get("every", 0), batch_size=entry.get("batch_size"))

  def __init__(self, *, images: common.Rows, captions, masks: Sequence[np.ndarray], tokenizer,
               prefix: str = "attn_mask", every: int = 0, batch_size: int | None = None):
    self.images, self.masks, self.prefix = images, list(masks), prefix
    self.every, self.batch_size = every, batch_size
    # The rule may rank patches by their similarity with a text: each picture's first caption.
    self.ids, self.mask = _texts(tokenizer, [caps[0][1] for caps in captions])

  def run(self, predictor: common.Predictor) -> dict[str, float]:
    rows = common.Rows(len(self.ids), lambda i: {**self.images.load(i), "text": self.ids[i],
                                                 "text_mask": self.mask[i]})
    chosen = predictor.run("select_patches", rows, self.batch_size)["masked"].astype(bool)
    grid = int(round(np.sqrt(chosen.shape[1])))
    objects = np.stack([object_patches(m, grid) for m in self.masks])
    rng = np.random.default_rng(0)
    random = np.zeros_like(chosen)
    for r, k in enumerate(chosen.sum(-1)):
      random[r, rng.choice(chosen.shape[1], int(k), replace=False)] = True
    return {f"{self.prefix}/iou": float(iou(chosen, objects).mean()),
            f"{self.prefix}/iou_random": float(iou(random, objects).mean()),
            f"{self.prefix}/object_patch_fraction": float(objects.mean()),
            f"{self.prefix}/chosen_patch_fraction": float(chosen.mean())}


def _unpack(packed: Mapping[str, Any]) -> np.ndarray:
  """The world's packed mask ({"shape", "bits" hex}, data_pipelines.synthetic_world.pack_mask)."""
  h, w = packed["shape"]
  bits = np.unpackbits(np.frombuffer(bytes.fromhex(packed["bits"]), np.uint8))
  return bits[:h * w].reshape(h, w).astype(bool)
