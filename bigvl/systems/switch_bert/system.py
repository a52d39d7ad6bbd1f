"""Switch-BERT on the system protocol: M²-Encoder's towers give each modality's depth bank (every
layer's token states), the fusion encoder (bigvl.models.switch_bert) learns per layer which
attention mode to use and which depth of the other modality to read, and three heads train on the
scene world at once: visual question answering (answer classification), image–text matching (the
true caption against a near miss that changes one object's colour or shape) and referring-
expression comprehension (the referred object's box among every object's box).

With `model.freeze_towers` the banks are constants of the step (the towers get no optimizer state);
the image bank is computed once per picture and shared by the three texts. With `init_from` empty
the m2_tiny backbone is trained first (bigvl.systems.backbone).
"""

from __future__ import annotations

import glob
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigvl.data.formats import scenes as scenes_format
from bigvl.models import m2_encoder, switch_bert
from bigvl.systems.on_towers import TowersSystem
from bigvl.systems.switch_bert import config as sb_config

PREDICTORS = ("answer_vqa", "refer", "itm_score")
TASKS = (("question", "vqa"), ("caption", "itm"), ("refer", "refer"))


class SwitchBertModel(nnx.Module):
  """`towers` (M²-Encoder) and `fusion` (SwitchBert with its heads)."""

  def __init__(self, towers: m2_encoder.M2Config, fusion: switch_bert.SwitchConfig, *,
               rngs: nnx.Rngs):
    self.towers = m2_encoder.M2Encoder(towers, rngs=rngs)
    self.fusion = switch_bert.SwitchBert(fusion, rngs=rngs)


class SwitchBertSystem(TowersSystem):
  name = "switch_bert"
  export_subtree = "towers"
  default_config = staticmethod(sb_config.default_config)
  PREDICTORS = PREDICTORS

  def __init__(self, config, mesh, rules):
    super().__init__(config, mesh, rules)
    self.answers: list[str] = []
    self.train_files: list[str] = []
    if config.model.freeze_towers:
      self.trainable = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("towers")))

  @classmethod
  def validate(cls, config, *, check_paths: bool = True, training: bool = True) -> None:
    sb_config.validate(config, check_paths=check_paths, training=training)

  # ------------------------------------------------------------------ data
  def _load_answers(self) -> None:
    from bigvl.evaluators import sources
    self.answers = list(sources.scenes_meta(self.scene_dir)["answers"])

  def prepare(self, workdir: str | None = None) -> None:
    self.prepare_towers(workdir)
    self._load_answers()
    self.train_files = sorted(glob.glob(os.path.join(self.scene_dir, "train-*.array_record")))
    if workdir is not None and not self.train_files:
      raise FileNotFoundError(f"no training scenes in {self.scene_dir}")

  def prepare_for_checkpoint(self, source: str) -> None:
    self.prepare_towers_for_checkpoint(source)
    self._load_answers()

  def train_data(self, local_batch: int, block: int, blocks: int):
    c = self.config.data
    return iter(scenes_format.train_dataset(
        self.train_files, tokenizer=self.tokenizer, image_size=self.image_size(),
        answers=self.answers, batch_size=local_batch, seed=self.config.seed,
        max_boxes=c.max_boxes, langs=c.langs.split(","), block=block, blocks=blocks,
        worker_count=c.worker_count, max_skip_fraction=c.max_skip_fraction))

  def batch_spec(self, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    s, n, k = self.image_size(), self.config.tokenizer.max_len, self.config.data.max_boxes
    S = jax.ShapeDtypeStruct
    spec = {"image": S((global_batch, s, s, 3), jnp.uint8),
            "answer": S((global_batch,), jnp.int32), "match": S((global_batch,), jnp.float32),
            "boxes": S((global_batch, k, 4), jnp.float32),
            "box_valid": S((global_batch, k), jnp.int32),
            "target": S((global_batch,), jnp.int32),
            "refer_valid": S((global_batch,), jnp.float32)}
    for key, _ in TASKS:
      spec[key] = spec[key + "_mask"] = S((global_batch, n), jnp.int32)
    return spec

  def fake_batch(self, global_batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    spec = self.batch_spec(global_batch)
    n, k = self.config.tokenizer.max_len, self.config.data.max_boxes
    out = {"image": rng.integers(0, 256, spec["image"].shape).astype(np.uint8),
           "answer": rng.integers(0, max(len(self.answers), 2), global_batch).astype(np.int32),
           "match": (rng.random(global_batch) < 0.5).astype(np.float32),
           "target": np.zeros(global_batch, np.int32),
           "refer_valid": np.ones(global_batch, np.float32),
           "box_valid": np.ones((global_batch, k), np.int32)}
    lo = rng.random((global_batch, k, 2)) * 0.5
    out["boxes"] = np.concatenate([lo, lo + 0.25], -1).astype(np.float32)
    for key, _ in TASKS:
      lengths = rng.integers(2, n + 1, global_batch)
      out[key] = rng.integers(1, 300, (global_batch, n)).astype(np.int32)
      out[key + "_mask"] = (np.arange(n)[None] < lengths[:, None]).astype(np.int32)
    return out

  # ------------------------------------------------------------------ model
  def switch_config(self, towers: m2_encoder.M2Config | None = None) -> switch_bert.SwitchConfig:
    t = towers or self.model_config()
    m = self.config.model
    depths = 1 + t.depth + t.vl_depth
    return switch_bert.SwitchConfig(
        width=m.fusion_width, heads=m.fusion_heads, mlp_dim=m.fusion_mlp_dim,
        depth=m.fusion_depth, text_in=t.width, image_in=t.width, text_depths=depths,
        image_depths=depths, modes=m.modes, selection=m.selection,
        num_answers=max(len(self.answers), 2), refer_depths=m.refer_depths)

  def make_model(self, rngs: nnx.Rngs) -> SwitchBertModel:
    return SwitchBertModel(self.model_config(), self.switch_config(), rngs=rngs)

  def make_eval_model(self, rngs: nnx.Rngs) -> SwitchBertModel:
    towers = self.eval_model_config()
    return SwitchBertModel(towers, self.switch_config(towers), rngs=rngs)

  def param_groups(self):
    return ((r"alpha_logits|beta_logits", self.config.model.switch_lr_multiplier),)

  # ------------------------------------------------------------------ banks and heads
  def _frozen(self, x):
    return jax.lax.stop_gradient(x) if self.config.model.freeze_towers else x

  def grid(self) -> int:
    """Patches per side of the image tokens the fusion layers see (after `model.image_pool`)."""
    t = self.model_config()
    return t.image_size // t.patch_size // self.config.model.image_pool

  def image_bank(self, model: SwitchBertModel, images: jax.Array) -> jax.Array:
    """(depths, B, 1 + grid², width): CLS and the (pooled) patches at every tower depth."""
    bank = jnp.stack(model.towers.image_depths(images))
    k = self.config.model.image_pool
    if k > 1:
      d, b, n, w = bank.shape
      g = math.isqrt(n - 1)
      if g * g != n - 1 or g % k:
        raise ValueError(f"model.image_pool={k} does not divide the {g}x{g} patch grid")
      patches = bank[:, :, 1:].reshape(d, b, g // k, k, g // k, k, w).mean(axis=(3, 5))
      bank = jnp.concatenate([bank[:, :, :1], patches.reshape(d, b, -1, w)], axis=2)
    return self._frozen(bank)

  def text_bank(self, model: SwitchBertModel, ids: jax.Array, mask: jax.Array) -> jax.Array:
    return self._frozen(jnp.stack(model.towers.text_depths(ids, mask)))

  def tau(self, step: jax.Array | int) -> jax.Array:
    """exp-annealed from loss.tau_start at step 0 to loss.tau_end at total_steps."""
    c = self.config.loss
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(self.config.total_steps, 1), 0.0, 1.0)
    return jnp.exp(math.log(c.tau_start) + frac * (math.log(c.tau_end) - math.log(c.tau_start)))

  def scheduled(self, step: jax.Array) -> dict[str, jax.Array]:
    return {"tau": self.tau(step)}

  def box_weights(self, boxes: jax.Array) -> jax.Array:
    return switch_bert.box_patch_weights(boxes, self.grid(), has_cls=True)

  def _encode(self, model, text_bank, image_bank, mask, rng, tau):
    return model.fusion.encode(text_bank, image_bank, mask.astype(bool), rng=rng, tau=tau)

  def loss(self, model: SwitchBertModel, batch, rng):
    c = self.config.loss
    tau = batch.get("tau", self.tau(self.config.total_steps))
    image_bank = self.image_bank(model, batch["image"])
    keys = jax.random.split(rng, len(TASKS))
    states = {}
    for (key, task), k in zip(TASKS, keys):
      bank = self.text_bank(model, batch[key], batch[key + "_mask"])
      states[task] = self._encode(model, bank, image_bank, batch[key + "_mask"], k, tau)
    f = model.fusion
    vqa = f.vqa_logits(*states["vqa"])
    vqa_nll = -jnp.take_along_axis(jax.nn.log_softmax(vqa), batch["answer"][:, None], 1)[:, 0]
    itm = f.itm_logit(*states["itm"])
    m = batch["match"]
    itm_nll = -(m * jax.nn.log_sigmoid(itm) + (1 - m) * jax.nn.log_sigmoid(-itm))
    scores = f.refer_scores(*states["refer"], self.box_weights(batch["boxes"]), batch["box_valid"],
                            image_bank)
    ref_nll = -jnp.take_along_axis(jax.nn.log_softmax(scores), batch["target"][:, None], 1)[:, 0]
    rv = batch["refer_valid"]
    ref_loss = (ref_nll * rv).sum() / jnp.maximum(rv.sum(), 1.0)
    loss = (c.vqa_weight * vqa_nll.mean() + c.itm_weight * itm_nll.mean()
            + c.refer_weight * ref_loss)
    aux = {"vqa": vqa_nll.mean(), "vqa_acc": (vqa.argmax(-1) == batch["answer"]).mean(),
           "itm": itm_nll.mean(), "itm_acc": ((itm > 0) == (m > 0.5)).mean(),
           "refer": ref_loss,
           "refer_acc": ((scores.argmax(-1) == batch["target"]) * rv).sum()
           / jnp.maximum(rv.sum(), 1.0)}
    aux.update(self.mixing_report(model, tau))
    return loss, aux

  def mixing_report(self, model: SwitchBertModel, tau) -> dict[str, jax.Array]:
    """The deterministic mode weights per (layer, modality) and the depth each reads most."""
    if self.config.model.modes == "joint":
      return {}
    alpha, beta = model.fusion.mixing_weights(None, tau)
    out = {}
    for l in range(alpha.shape[0]):
      for m, side in enumerate(("text", "image")):
        for j, mode in enumerate(switch_bert.ATTENTION_MODES):
          out[f"switch/l{l}/{side}/{mode}"] = alpha[l, m, j]
        out[f"switch/l{l}/{side}/depth"] = jnp.argmax(beta[l, m]).astype(jnp.float32)
        out[f"switch/l{l}/{side}/depth_weight"] = jnp.max(beta[l, m])
    return out

  # ------------------------------------------------------------------ evaluation and reports
  def predictors(self, graphdef) -> dict[str, Callable[[Any, dict], dict]]:
    tau = self.tau(self.config.total_steps)

    def states(p, b, with_bank=False):
      model = nnx.merge(graphdef, p)
      bank = self.text_bank(model, b["text"], b["text_mask"])
      image_bank = self.image_bank(model, b["image"])
      out = model, self._encode(model, bank, image_bank, b["text_mask"], None, tau)
      return (*out, image_bank) if with_bank else out

    def answer_vqa(p, b):
      model, (t, v) = states(p, b)
      return {"logits": model.fusion.vqa_logits(t, v)}

    def refer(p, b):
      model, (t, v), image_bank = states(p, b, with_bank=True)
      return {"scores": model.fusion.refer_scores(t, v, self.box_weights(b["boxes"]),
                                                  b["box_valid"], image_bank)}

    def itm_score(p, b):
      model, (t, v) = states(p, b)
      return {"score": model.fusion.itm_logit(t, v)}

    return {"answer_vqa": answer_vqa, "refer": refer, "itm_score": itm_score}

  def describe(self) -> dict[str, Any]:
    m = self.config.model
    return super().describe() | {
        "fusion": {k: m[k] for k in ("fusion_width", "fusion_heads", "fusion_mlp_dim",
                                     "fusion_depth", "modes", "selection", "freeze_towers")},
        "backbone": self.config.init_from}
