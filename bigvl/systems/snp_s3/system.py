"""SNP-S3 (arXiv 2401.17773) on the system protocol: video–text pretraining with one shared BERT
(`bigvl.models.snp_s3`), Masked Significant Semantic Modelling, Local Vision-Word Matching, a MoCo
contrast with a momentum encoder and queues, and matching with a hard false caption; then video
QA (multiple choice and open) fine-tuned from it.

Pretraining loss, per batch of B (clip, caption) pairs, all weights in `loss.*`:
  MSSM   ~15% of the caption's tokens, drawn from its significant words only
         (`loss.masking="random"`: any real token, plain MLM), 80/10/10 [MASK] / a same-lemma or
         same-class variant / unchanged (`bigvl.losses.mlm`); the masked caption goes through the
         cross-modal encoder [masked text; visual; SEP] and the MLM head predicts the originals.
         The head sees only the masked input (the authors' text-only head reads the unmasked
         caption: not copied; there is no text-only MLM here).
  LVWM   `lvwm_words` (3) significant-word features of the text-only pass against the clip's
         visual-token features, logsumexp over (word, clip) pairs, MIL-NCE both ways
         (`bigvl.losses.milnce`).
  ITC    the [CLS] text embedding against the momentum encoder's video embeddings of the batch and
         the video queue, and the video embedding against momentum text embeddings and the text
         queue (`moco.batch_and_queue_contrastive`), temperature `loss.temperature`.
  ITM    each clip with its caption (match) and with the batch's most similar other caption
         (by the detached ITC similarity; captions with the same tokens as the clip's own are not
         negatives), 2-way cross-entropy on the cross-modal [CLS].
The momentum encoder (a copy of every parameter) and the two queues live in the train state's
`extra`: checkpointed, resumed bit-exact, the momentum copy sharded as the parameters, the queues
replicated. Each step reads the queues as they were, then writes its momentum keys; after the
optimizer update the momentum copy moves towards the new parameters (`post_update`).

QA (`task="qa"`): K choices, each [question + choice; visual; SEP] scored by `qa_choice`,
softmax cross-entropy; the open question [question; visual; SEP] classified over the answer
vocabulary by `qa_open` (items without an open class are left out).
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from bigvl.data import significant as significant_lib
from bigvl.data.formats import video_qa, video_text
from bigvl.evaluators import build as eval_build
from bigvl.losses import milnce, mlm, moco
from bigvl.models import snp_s3 as model_lib
from bigvl.systems import backbone, base, videos
from bigvl.systems.m2_encoder.system import pin_tokenizer, tokenizer_source
from bigvl.systems.m2_encoder.system import vocab_size as shared_vocab_size
from bigvl.systems.snp_s3 import config as snp_config
from bigvl.tokenizers import glm

log = logging.getLogger("bigvl")
WORDS_FILE = "significant_words.tsv"
ANSWERS_FILE = "qa_answers.txt"


def _ce(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy and accuracy over the rows where `valid`."""
  logits = logits.astype(jnp.float32)
  safe = jnp.where(valid, labels, 0)
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, safe[:, None], -1)[:, 0]
  n = jnp.maximum(jnp.sum(valid), 1)
  hit = (jnp.argmax(logits, -1) == safe) & valid
  return jnp.sum(jnp.where(valid, nll, 0.0)) / n, jnp.sum(hit) / n


class SNPS3System(base.System):
  name = "snp_s3"
  PREDICTORS = ("encode_video", "encode_text", "score_tiles", "qa_choice", "qa_open")

  default_config = staticmethod(snp_config.default_config)

  def __init__(self, config, mesh, rules):
    super().__init__(config, mesh, rules)
    self.tokenizer: glm.GLMTokenizer | None = None
    self.data_dir = ""
    self.train_files: list[str] = []
    self.words: significant_lib.SignificantWords | None = None
    self.answers: list[str] = []
    self.tables: dict[str, np.ndarray] = {}

  @classmethod
  def validate(cls, config, *, check_paths: bool = True, training: bool = True) -> None:
    snp_config.validate(config, check_paths=check_paths, training=training)

  # ------------------------------------------------------------------ data and tokenizer
  def _tokenizer_source(self, source: str) -> str:
    world = (os.path.join(self.data_dir, "tokenizer.model")
             if self.config.data.kind == "video_world" else "")
    return tokenizer_source(self.config, source, world)

  def _significant_words(self, workdir: str | None) -> significant_lib.SignificantWords:
    """The run's word file: data.significant_words, else (the world) mined from its captions and
    kept in the world's folder; pinned in the workdir as the tokenizer is."""
    c = self.config
    path = c.data.significant_words
    if not path and self.config.init_from and os.path.isfile(
        os.path.join(c.init_from, WORDS_FILE)):
      path = os.path.join(c.init_from, WORDS_FILE)
    if not path:
      if c.data.kind != "video_world":
        raise ValueError("set data.significant_words (launch/significant_words.py)")
      path = os.path.join(self.data_dir, WORDS_FILE)
      if jax.process_index() == 0 and not os.path.isfile(path):
        words, groups = significant_lib.world_words(c.data.world.seed)
        significant_lib.write(path, words, groups)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("bigvl_significant_words")
    if workdir:
      pinned = os.path.join(workdir, WORDS_FILE)
      if jax.process_index() == 0 and not os.path.exists(pinned):
        with open(path, encoding="utf-8") as f, open(pinned + ".tmp", "w", encoding="utf-8") as g:
          g.write(f.read())
        os.replace(pinned + ".tmp", pinned)
      path = pinned if os.path.exists(pinned) else path
    return significant_lib.SignificantWords.from_file(path)

  def _answers(self) -> list[str]:
    c = self.config
    if c.qa.answers:
      with open(c.qa.answers, encoding="utf-8") as f:
        out = [line.strip() for line in f if line.strip()]
      if not out:
        raise ValueError(f"qa.answers={c.qa.answers!r} holds no answer")
      return out
    if c.data.kind == "video_world":
      return video_qa.world_answers(self.data_dir)
    return []

  def _load(self, workdir: str | None, source: str = "") -> None:
    c = self.config
    if c.data.kind == "video_world":
      self.data_dir = videos.build_video_world(c, c.model.frame_size)
    tok = self._tokenizer_source(source)
    if workdir:
      tok = pin_tokenizer(workdir, tok)
    self.tokenizer = glm.GLMTokenizer(tok, max_len=c.tokenizer.max_len)
    self.words = self._significant_words(workdir)
    self.answers = self._answers() if c.task == "qa" else []
    variants, counts, pool = self.words.variant_table(self.tokenizer, self.vocab_size)
    if c.loss.masking == "random":   # plain MLM: variants are BERT's random tokens
      counts = np.zeros_like(counts)
      pool = np.arange(self.vocab_size, dtype=np.int32)
    self.tables = {"variants": variants, "counts": counts, "pool": pool}

  def prepare(self, workdir: str | None = None) -> None:
    c = self.config
    if workdir is not None and c.task == "qa" and not c.init_from and c.backbone.config:
      backbone.ensure(c)
    self._load(workdir)
    if c.data.kind == "video_world":
      split = "train"
      self.train_files = sorted(glob.glob(os.path.join(self.data_dir, f"{split}-*.array_record")))
    else:
      self.train_files = sorted(glob.glob(c.data.train_files))
    if not self.train_files:
      raise FileNotFoundError(f"no training shards ({c.data.kind}: "
                              f"{self.data_dir or c.data.train_files})")

  def prepare_for_checkpoint(self, source: str) -> None:
    self._load(None, source)

  @property
  def vocab_size(self) -> int:
    """The tokenizer's; before prepare() (launch/plan.py, which reads no data) model.vocab_size."""
    return shared_vocab_size(self.tokenizer, self.config.model.vocab_size, "SNP-S3's model")

  def train_data(self, local_batch: int, block: int, blocks: int):
    c = self.config
    common = dict(tokenizer=self.tokenizer, num_frames=c.data.num_frames,
                  frame_size=c.model.frame_size, batch_size=local_batch, seed=c.seed, block=block,
                  blocks=blocks, worker_count=c.data.worker_count,
                  max_skip_fraction=c.data.max_skip_fraction)
    if c.task == "qa":
      return iter(video_qa.train_dataset(self.train_files, answers=self.answers,
                                         num_choices=c.data.qa_choices, **common))
    return iter(video_text.train_dataset(self.train_files, min_frames=c.data.min_frames,
                                         significant=self.words, **common))

  def batch_spec(self, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    c = self.config
    b, t, s, n = global_batch, c.data.num_frames, c.model.frame_size, c.tokenizer.max_len
    i32 = jnp.int32
    spec = {"frames": jax.ShapeDtypeStruct((b, t, s, s, 3), jnp.uint8),
            "frame_mask": jax.ShapeDtypeStruct((b, t), i32),
            "text": jax.ShapeDtypeStruct((b, n), i32),
            "text_mask": jax.ShapeDtypeStruct((b, n), i32)}
    if c.task == "qa":
      k = c.data.qa_choices
      spec.update({"choice_text": jax.ShapeDtypeStruct((b, k, n), i32),
                   "choice_mask": jax.ShapeDtypeStruct((b, k, n), i32),
                   "choice_valid": jax.ShapeDtypeStruct((b, k), i32),
                   "choice_answer": jax.ShapeDtypeStruct((b,), i32),
                   "open_answer": jax.ShapeDtypeStruct((b,), i32)})
    else:
      spec["significant"] = jax.ShapeDtypeStruct((b, n), i32)
    return spec

  def fake_batch(self, global_batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = super().fake_batch(global_batch, seed)
    n = self.config.tokenizer.max_len
    lengths = rng.integers(4, n + 1, global_batch)
    mask = (np.arange(n)[None] < lengths[:, None]).astype(np.int32)
    out["frames"] = rng.integers(0, 256, out["frames"].shape).astype(np.uint8)
    out["frame_mask"] = np.ones_like(out["frame_mask"])
    out["text"] = (rng.integers(5, 300, (global_batch, n)) * mask).astype(np.int32)
    out["text_mask"] = mask
    if "significant" in out:
      out["significant"] = (mask * (rng.random(mask.shape) < 0.5)).astype(np.int32)
    if "choice_text" in out:
      out["choice_text"] = np.repeat(out["text"][:, None], out["choice_text"].shape[1], 1)
      out["choice_mask"] = np.repeat(mask[:, None], out["choice_mask"].shape[1], 1)
      out["choice_valid"] = np.ones_like(out["choice_valid"])
    return out

  # ------------------------------------------------------------------ model
  def model_config(self) -> model_lib.SNPS3Config:
    c = self.config
    m = c.model
    return model_lib.SNPS3Config(
        vocab_size=self.vocab_size, max_len=c.tokenizer.max_len, width=m.width, depth=m.depth,
        heads=m.heads, mlp_dim=m.mlp_dim, embed_dim=m.embed_dim, frame_size=m.frame_size,
        patch_size=m.patch_size, vit_width=m.vit_width, vit_depth=m.vit_depth,
        vit_heads=m.vit_heads, num_frames=c.data.num_frames, temporal=m.temporal,
        temporal_depth=m.temporal_depth, clip_groups=m.clip_groups, patch_grid=m.patch_grid,
        open_answers=len(self.answers), init_std=m.init_std, dtype=m.dtype,
        attention=m.attention)

  def make_model(self, rngs: nnx.Rngs) -> model_lib.SNPS3Model:
    return model_lib.SNPS3Model(self.model_config(), rngs=rngs)

  # ------------------------------------------------------------------ extra state: MoCo
  @property
  def uses_moco(self) -> bool:
    return self.config.task == "pretrain" and self.config.loss.itc_weight > 0

  def init_extra(self, params):
    if not self.uses_moco:
      return {}
    c = self.config
    d = c.model.embed_dim
    return {"momentum": jax.tree.map(jnp.array, params),
            "queue_t": moco.init_queue(c.loss.queue_size, d),
            "queue_v": moco.init_queue(c.loss.queue_size, d)}

  def value_and_grad_with_extra(self, graphdef, params, frozen, extra, batch, rng):
    if not self.uses_moco:
      return super().value_and_grad_with_extra(graphdef, params, frozen, extra, batch, rng)
    keys_t, keys_v = self.momentum_keys(graphdef, extra["momentum"], frozen, batch)
    batch = {**batch, "key_t": keys_t, "key_v": keys_v,
             "queue_t": extra["queue_t"]["queue"], "valid_t": moco.valid_rows(extra["queue_t"]),
             "queue_v": extra["queue_v"]["queue"], "valid_v": moco.valid_rows(extra["queue_v"])}
    loss_aux, grads = self.value_and_grad(graphdef, params, frozen, batch, rng)
    extra = {"momentum": extra["momentum"],
             "queue_t": moco.enqueue(extra["queue_t"], keys_t),
             "queue_v": moco.enqueue(extra["queue_v"], keys_v)}
    return loss_aux, grads, extra

  def momentum_keys(self, graphdef, momentum, frozen, batch) -> tuple[jax.Array, jax.Array]:
    """The momentum encoder's text and video embeddings of the batch (no gradient)."""
    m = nnx.merge(graphdef, jax.lax.stop_gradient(momentum), frozen)
    _, t = m.encode_text(batch["text"], batch["text_mask"])
    _, v = m.embed_video(*m.visual_tokens(batch["frames"], batch["frame_mask"]))
    return jax.lax.stop_gradient(t), jax.lax.stop_gradient(v)

  def post_update(self, params, extra, step):
    if not self.uses_moco:
      return params, extra
    return params, {**extra, "momentum": moco.momentum_update(extra["momentum"], params,
                                                               self.config.loss.momentum)}

  # ------------------------------------------------------------------ losses
  def special_ids(self) -> tuple[int, int, int]:
    """([CLS], EOS (also the cross-modal [SEP]), [MASK]); placeholders before prepare() (plans,
    which compile shapes only)."""
    tok = self.tokenizer
    return (tok.cls_id, tok.eos_id, tok.mask_id) if tok is not None else (0, 1, 2)

  def word_mask(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Real tokens that are not [CLS] or EOS."""
    cls, eos, _ = self.special_ids()
    return mask.astype(bool) & (ids != cls) & (ids != eos)

  def loss(self, model, batch, rng):
    if self.config.task == "qa":
      return self.qa_loss(model, batch)
    return self.pretrain_loss(model, batch, rng)

  def mask_batch(self, rng, ids, mask, significant) -> dict[str, jax.Array]:
    c = self.config.loss
    words = self.word_mask(ids, mask)
    cands = significant.astype(bool) & words if c.masking == "significant" else words
    t = self.tables or {"variants": np.zeros((self.vocab_size, 1), np.int32),   # a plan's
                        "counts": np.zeros((self.vocab_size,), np.int32),       # placeholders
                        "pool": np.arange(self.vocab_size, dtype=np.int32)}
    return mlm.mask_tokens(rng, ids, words, cands, mask_id=self.special_ids()[2],
                           ratio=c.mask_ratio, variants=jnp.asarray(t["variants"]),
                           variant_counts=jnp.asarray(t["counts"]),
                           fallback=jnp.asarray(t["pool"]), p_mask=c.p_mask,
                           p_variant=c.p_variant)

  def mlm_outputs(self, model, batch, rng, visual=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(MLM logits (B, L, V), the masking): the caption masked (MSSM or plain), then
    [masked caption; visual; SEP] through the shared encoder; the head reads only that."""
    ids, mask = batch["text"], batch["text_mask"]
    vis, vmask = visual if visual is not None else model.visual_tokens(batch["frames"],
                                                                       batch["frame_mask"])
    m = self.mask_batch(rng, ids, mask, batch["significant"])
    h = model.cross(m["ids"], mask, vis, vmask, self.special_ids()[1])[:, :ids.shape[1]]
    return model.mlm_logits(h), m

  def pretrain_loss(self, model, batch, rng):
    c = self.config.loss
    sep = self.special_ids()[1]
    k_mask, k_words = jax.random.split(rng)
    ids, mask = batch["text"], batch["text_mask"]
    vis, vmask = model.visual_tokens(batch["frames"], batch["frame_mask"])
    clip_f, vid = model.embed_video(vis, vmask)
    states, txt = model.encode_text(ids, mask)
    aux: dict[str, jax.Array] = {}
    total = jnp.float32(0.0)
    # MSSM / MLM on the cross-modal encoding of the masked caption.
    if c.mlm_weight:
      logits, m = self.mlm_outputs(model, batch, k_mask, (vis, vmask))
      l_mlm, a = mlm.mlm_loss(logits, m["targets"], m["selected"])
      aux.update(loss_mlm=l_mlm, mlm_acc=a["acc"], mlm_tokens=a["tokens"])
      total = total + c.mlm_weight * l_mlm
    # LVWM: significant-word features of the text-only pass against the clip features.
    if c.lvwm_weight:
      feats, wmask, _ = milnce.gather_words(model.word_features(states),
                                            batch["significant"].astype(bool), c.lvwm_words,
                                            k_words, valid=self.word_mask(ids, mask))
      l_lvwm, a = milnce.lvwm_loss(feats, wmask, clip_f, vmask, c.temperature)
      aux.update(loss_lvwm=l_lvwm, lvwm_acc=0.5 * (a["acc_t2v"] + a["acc_v2t"]))
      total = total + c.lvwm_weight * l_lvwm
    # ITC against the momentum keys and the queues (in `batch` from value_and_grad_with_extra).
    if c.itc_weight:
      l_t2v, a_t = moco.batch_and_queue_contrastive(txt, batch["key_v"], batch["queue_v"],
                                                    batch["valid_v"], c.temperature)
      l_v2t, a_v = moco.batch_and_queue_contrastive(vid, batch["key_t"], batch["queue_t"],
                                                    batch["valid_t"], c.temperature)
      l_itc = 0.5 * (l_t2v + l_v2t)
      aux.update(loss_itc=l_itc, itc_acc=0.5 * (a_t["acc"] + a_v["acc"]),
                 queue_negatives=jnp.sum(batch["valid_v"]))
      total = total + c.itc_weight * l_itc
    # ITM with the hardest other caption of the batch.
    if c.itm_weight:
      b = ids.shape[0]
      sim = jax.lax.stop_gradient(txt @ vid.T)                      # (texts, videos)
      same = jnp.all(ids[:, None] == ids[None], axis=-1)            # identical captions
      neg = jnp.argmax(jnp.where(same, -jnp.inf, sim), axis=0)      # per video: a text
      has_neg = ~jnp.all(same, axis=0)
      pos_h = model.cross(ids, mask, vis, vmask, sep)[:, 0]
      neg_h = model.cross(ids[neg], mask[neg], vis, vmask, sep)[:, 0]
      logits = model.itm(jnp.concatenate([pos_h, neg_h]))
      labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((b,), jnp.int32)])
      valid = jnp.concatenate([jnp.ones((b,), bool), has_neg])
      l_itm, acc = _ce(logits, labels, valid)
      aux.update(loss_itm=l_itm, itm_acc=acc)
      total = total + c.itm_weight * l_itm
    return total, aux

  def choice_scores(self, model, vis, vmask, choice_text, choice_mask, choice_valid):
    """(B, K) scores of question + choice k with the video: the QA head (task qa), or zero-shot
    after pretraining the matching head's match logit minus its mismatch logit."""
    b, k, n = choice_text.shape
    rep = lambda x: jnp.repeat(x, k, axis=0)
    h = model.cross(choice_text.reshape(b * k, n), choice_mask.reshape(b * k, n), rep(vis),
                    rep(vmask), self.special_ids()[1])[:, 0]
    if self.config.task == "qa":
      scores = model.qa_choice(h).astype(jnp.float32).reshape(b, k)
    else:
      logits = model.itm(h).astype(jnp.float32)
      scores = (logits[:, 1] - logits[:, 0]).reshape(b, k)
    return jnp.where(choice_valid.astype(bool), scores, -1e9)

  def qa_loss(self, model, batch):
    c = self.config.loss
    vis, vmask = model.visual_tokens(batch["frames"], batch["frame_mask"])
    scores = self.choice_scores(model, vis, vmask, batch["choice_text"], batch["choice_mask"],
                                batch["choice_valid"])
    l_mc, acc_mc = _ce(scores, batch["choice_answer"], jnp.ones(scores.shape[:1], bool))
    total = c.qa_mc_weight * l_mc
    aux = {"loss_mc": l_mc, "mc_acc": acc_mc}
    if model.qa_open is not None and c.qa_open_weight:
      h = model.cross(batch["text"], batch["text_mask"], vis, vmask, self.special_ids()[1])[:, 0]
      l_open, acc_open = _ce(model.qa_open(h), batch["open_answer"], batch["open_answer"] >= 0)
      aux.update(loss_open=l_open, open_acc=acc_open)
      total = total + c.qa_open_weight * l_open
    return total, aux

  # ------------------------------------------------------------------ evaluation
  def predictors(self, graphdef):
    sep = self.special_ids()[1]

    def encode_video(p, b):
      m = nnx.merge(graphdef, p)
      _, v = m.embed_video(*m.visual_tokens(b["frames"], b["frame_mask"]))
      return {"tokens": v[:, None], "frame_mask": jnp.ones(v.shape[:1] + (1,), jnp.int32)}

    def encode_text(p, b):
      _, t = nnx.merge(graphdef, p).encode_text(b["text"], b["text_mask"])
      tokens = jnp.zeros(b["text"].shape + t.shape[-1:], t.dtype).at[:, 0].set(t)
      return {"tokens": tokens}

    def score_tiles(p, b):
      del p
      return {"sim": jnp.einsum("kid,kjd->kij", b["t"][:, :, 0], b["v"][:, :, 0])}

    def qa_choice(p, b):
      m = nnx.merge(graphdef, p)
      vis, vmask = m.visual_tokens(b["frames"], b["frame_mask"])
      return {"scores": self.choice_scores(m, vis, vmask, b["choice_text"], b["choice_mask"],
                                           b["choice_valid"])}

    def qa_open(p, b):
      m = nnx.merge(graphdef, p)
      vis, vmask = m.visual_tokens(b["frames"], b["frame_mask"])
      h = m.cross(b["text"], b["text_mask"], vis, vmask, sep)[:, 0]
      if m.qa_open is None:
        return {"logits": jnp.zeros((h.shape[0], 1), jnp.float32)}
      return {"logits": m.qa_open(h).astype(jnp.float32)}

    return {"encode_video": encode_video, "encode_text": encode_text,
            "score_tiles": score_tiles, "qa_choice": qa_choice, "qa_open": qa_open}

  def eval_entries(self) -> ml_collections.ConfigDict:
    """config.evals with the system's keys filled: frames per video, uniform text weights, the
    QA entries' choices and answer vocabulary."""
    c = self.config
    evals = ml_collections.ConfigDict(c.evals.to_dict())
    for entry in evals.values():
      if "num_frames" in entry and not entry.num_frames:
        entry.num_frames = c.data.num_frames
      if "text_weights" in entry and not entry.text_weights:
        entry.text_weights = "uniform"
      if "choices" in entry and not entry.choices:
        entry.choices = c.data.qa_choices
      if "answers" in entry and not entry.answers:
        entry.answers = c.qa.answers        # "": the world's, as training
      if "formats" in entry and not entry.formats:
        # Pretraining has no QA heads: multiple choice zero-shot, by the matching head.
        entry.formats = "mc,open" if c.task == "qa" else "mc"
    return evals

  def evaluators(self, only: Sequence[str] | None = None) -> dict[str, Any]:
    world = self.data_dir if self.config.data.kind == "video_world" else ""
    return eval_build.build_all(self.eval_entries(), tokenizer=self.tokenizer,
                                image_size=self.config.model.frame_size, world_dir=world,
                                only=only, predictors=self.PREDICTORS)

  def describe(self) -> dict[str, Any]:
    c = self.config
    return {"task": c.task, "masking": c.loss.masking, "width": c.model.width,
            "depth": c.model.depth, "frames": c.data.num_frames,
            "clip_groups": c.model.clip_groups, "queue": c.loss.queue_size}
