"""The text-as-image multi-label adapter on the system protocol (bigvl.models.tai_adapter).

Training reads sentences and their labels only: the batch holds token ids and a multi-hot label
vector, no picture (`batch_spec`); the towers are frozen (`trainable` leaves them out, so they get
no optimizer state and their bytes are saved once, as loaded from `init_from`). Each step embeds
the sentences with the frozen text tower, perturbs the un-normalised embeddings, adapts them and
scores them against the label prompts' embeddings (computed by the same frozen tower, so they are
constants of the step). Evaluation applies the same adapter to image embeddings (`adapt_image`).

With `init_from` empty the system first trains its backbone (`bigvl.systems.backbone`); the towers
are sized by the backbone run's own config (or a parameter directory's config.json), which
`prepare` writes into this run's config.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigvl.data import label_sentences
from bigvl.data.formats import label_text
from bigvl.evaluators import templates as templates_lib
from bigvl.losses import multilabel
from bigvl.models import m2_encoder, tai_adapter
from bigvl.systems.on_towers import TowersSystem
from bigvl.systems.tai_adapter import config as tai_config

log = logging.getLogger("bigvl")
PREDICTORS = ("embed_image", "embed_text", "adapt_image", "adapt_text")
SENTENCES_FILE = "label_sentences.jsonl"

# Sentence templates for the embedded world, in words its tokenizer was trained on (its captions'
# and zero-shot prompts'); "{list}" is the labels joined ("a red circle and a blue square").
WORLD_TEMPLATES = {
    "en": ["a photo of {list}", "there is {list}", "an image with {list}", "you can see {list}",
           "a drawing of {list}", "a picture with {list}", "{list} on a plain background"],
    "zh": ["图中有{list}", "画面中有{list}", "一张图片，图中有{list}", "这是{list}",
           "一幅画：图中有{list}", "画面上画着{list}"],
}


class TaIAdapterSystem(TowersSystem):
  name = "tai_adapter"
  trainable = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("towers")))
  export_subtree = "towers"
  default_config = staticmethod(tai_config.default_config)
  PREDICTORS = PREDICTORS

  def __init__(self, config, mesh, rules):
    super().__init__(config, mesh, rules)
    self.labels: list[dict[str, str]] = []
    self.lines: list[bytes] = []
    self.prompts: list[tuple[np.ndarray, np.ndarray]] = []   # (ids, mask) per prompt language

  @classmethod
  def validate(cls, config, *, check_paths: bool = True, training: bool = True) -> None:
    tai_config.validate(config, check_paths=check_paths, training=training)

  # ------------------------------------------------------------------ data
  def _load_labels(self) -> None:
    c = self.config.data
    if c.labels:
      self.labels = [{"en": l.en, **({"zh": l.zh} if l.zh else {})}
                     for l in label_sentences.read_labels(c.labels)]
    else:
      from bigvl.evaluators import sources
      self.labels = sources.scenes_meta(self.scene_dir)["labels"]

  def _sentences(self, workdir: str | None) -> list[bytes]:
    c = self.config.data
    if c.sentences:
      return label_text.read_lines(c.sentences)
    path = os.path.join(workdir, SENTENCES_FILE)
    if jax.process_index() == 0 and not os.path.exists(path):
      labels = [label_sentences.Label(l["en"], l.get("zh")) for l in self.labels]
      generator = label_sentences.TemplateGenerator(templates=WORLD_TEMPLATES,
                                                    seed=self.config.seed)
      rows, report = label_sentences.generate_sentences(
          labels, c.num_sentences, generator, langs=tuple(c.langs.split(",")),
          seed=self.config.seed, min_labels=c.min_labels, max_labels=c.max_labels)
      with open(path + ".tmp", "w", encoding="utf-8") as f:
        for row in rows:
          f.write(json.dumps(row, ensure_ascii=False) + "\n")
      os.replace(path + ".tmp", path)
      log.info("label sentences: %s", report)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("bigvl_label_sentences")
    return label_text.read_lines(path)

  def _prompts(self) -> None:
    """Per prompt language, the label prompts' token ids (C * P, L), label-major, as constants of
    the loss: the languages, templates and tokenisation of the `multilabel` evaluator."""
    from bigvl.data.prompts import format_prompt
    from bigvl.evaluators import common, multilabel as multilabel_eval
    c = self.config.data
    table = templates_lib.load(c.label_templates)
    langs = multilabel_eval.prompt_langs(self.labels, table, c.label_langs.split(","))
    if not langs:
      raise ValueError(f"data.label_langs={c.label_langs!r}: no language has templates in "
                       f"{c.label_templates!r} and a name for every label")
    tok = common.as_written(self.tokenizer)
    self.prompts = [tok.encode_batch([format_prompt(t, label[lang]) for label in self.labels
                                      for t in table[lang]]) for lang in langs]

  def prepare(self, workdir: str | None = None) -> None:
    self.prepare_towers(workdir)
    self._load_labels()
    self._prompts()
    if workdir is not None:
      self.lines = self._sentences(workdir)

  def prepare_for_checkpoint(self, source: str) -> None:
    self.prepare_towers_for_checkpoint(source)
    self._load_labels()
    self._prompts()

  def train_data(self, local_batch: int, block: int, blocks: int):
    return iter(label_text.train_dataset(
        self.lines, tokenizer=self.tokenizer, label_names=[l["en"] for l in self.labels],
        batch_size=local_batch, seed=self.config.seed, block=block, blocks=blocks,
        worker_count=self.config.data.worker_count,
        max_skip_fraction=self.config.data.max_skip_fraction))

  @property
  def num_labels(self) -> int:
    return len(self.labels) or 1

  def batch_spec(self, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    n = self.config.tokenizer.max_len
    return {"text": jax.ShapeDtypeStruct((global_batch, n), jnp.int32),
            "text_mask": jax.ShapeDtypeStruct((global_batch, n), jnp.int32),
            "labels": jax.ShapeDtypeStruct((global_batch, self.num_labels), jnp.float32)}

  def fake_batch(self, global_batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = self.config.tokenizer.max_len
    lengths = rng.integers(2, n + 1, global_batch)
    return {"text": rng.integers(1, 300, (global_batch, n)).astype(np.int32),
            "text_mask": (np.arange(n)[None] < lengths[:, None]).astype(np.int32),
            "labels": (rng.random((global_batch, self.num_labels)) < 0.1).astype(np.float32)}

  # ------------------------------------------------------------------ model and loss
  def tai_config(self, towers=None) -> tai_adapter.TaIConfig:
    m = self.config.model
    return tai_adapter.TaIConfig(towers=towers or self.model_config(),
                                 adapter_dim=m.adapter_dim, activation=m.adapter_activation or None,
                                 init_scale=m.init_scale, init_bias=m.init_bias)

  def make_model(self, rngs: nnx.Rngs) -> tai_adapter.TaIAdapter:
    return tai_adapter.TaIAdapter(self.tai_config(), rngs=rngs)

  def make_eval_model(self, rngs: nnx.Rngs) -> tai_adapter.TaIAdapter:
    return tai_adapter.TaIAdapter(self.tai_config(self.eval_model_config()), rngs=rngs)

  def label_embeddings(self, model: tai_adapter.TaIAdapter) -> jax.Array:
    """(C, d) unit label embeddings, as the `multilabel` evaluator makes them: per language the
    mean of the prompts' unit embeddings, renormalised; the languages averaged and renormalised."""
    n = self.config.tokenizer.max_len
    # Planning without prepare(): one prompt per label.
    prompts = self.prompts or [(np.ones((self.num_labels, n), np.int32),) * 2]
    z = sum(tai_adapter.label_embeddings(model.towers, jnp.asarray(ids), jnp.asarray(mask),
                                         self.num_labels) for ids, mask in prompts)
    return jax.lax.stop_gradient(m2_encoder.l2_normalize(z))

  def loss(self, model: tai_adapter.TaIAdapter, batch, rng):
    c = self.config.loss
    labels = self.label_embeddings(model)
    e = jax.lax.stop_gradient(model.towers.text_features(batch["text"], batch["text_mask"]))
    noisy = tai_adapter.perturb(e, rng, c.noise, c.noise_std)
    logits = model.logits(noisy, labels)
    t = batch["labels"]
    if c.kind == "asl":
      loss = multilabel.asymmetric_loss(logits, t, gamma_pos=c.asl_gamma_pos,
                                        gamma_neg=c.asl_gamma_neg, clip=c.asl_clip)
    else:
      loss = multilabel.binary_cross_entropy(logits, t)
    p = jax.nn.sigmoid(logits)
    npos = jnp.maximum(t.sum(), 1.0)
    aux = {"pos_prob": (p * t).sum() / npos,
           "neg_prob": (p * (1 - t)).sum() / jnp.maximum((1 - t).sum(), 1.0),
           "noise_ratio": (jnp.linalg.norm(noisy - e, axis=-1)
                           / jnp.maximum(jnp.linalg.norm(e, axis=-1), 1e-6)).mean(),
           "embedding_norm": jnp.linalg.norm(e, axis=-1).mean()}
    return loss, aux

  # ------------------------------------------------------------------ evaluation and reports
  def predictors(self, graphdef) -> dict[str, Callable[[Any, dict], dict]]:
    def towers(p):
      return nnx.merge(graphdef, p)

    return {
        "embed_image": lambda p, b: {"embedding": towers(p).towers.encode_image(b["image"])},
        "embed_text": lambda p, b: {
            "embedding": towers(p).towers.encode_text(b["text"], b["text_mask"])},
        "adapt_image": lambda p, b: {"embedding": (lambda m: m.adapt(
            m.towers.image_features(b["image"])))(towers(p))},
        "adapt_text": lambda p, b: {"embedding": (lambda m: m.adapt(
            m.towers.text_features(b["text"], b["text_mask"])))(towers(p))},
    }

  def describe(self) -> dict[str, Any]:
    c = self.config
    return super().describe() | {
        "backbone": c.init_from, "labels": self.num_labels, "loss": c.loss.kind,
        "noise": c.loss.noise, "noise_std": c.loss.noise_std}
