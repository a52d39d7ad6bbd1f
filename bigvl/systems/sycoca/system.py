"""SyCoCa on the system protocol: M²-Encoder's towers, data and tokenizer, trained with
λ_itc·ITC + λ_ic·IC + λ_mim·TG-MIM (bigvl.models.sycoca).

The loss is computed in two parts so that GradCache applies unchanged: `rows` gives every example's
own outputs (its two embeddings, its captioning NLL and token count, its TG-MIM error), and
`combine` the batch loss from all rows (the ring InfoNCE couples the batch; the other terms are sums
over rows). With `loss.accum_steps` K the contrastive batch stays the global batch while one
micro-batch's activations are alive. Random masking draws its noise per step, outside the rows, so
that GradCache's two forward passes of a micro-batch agree.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigvl import losses
from bigvl.evaluators import build as eval_build
from bigvl.losses import mim as mim_loss
from bigvl.losses.token_ce import token_cross_entropy
from bigvl.models import sycoca
from bigvl.models.layers import generate, masking
from bigvl.models.layers.vit import normalize_pixels
from bigvl.parallel import mesh as mesh_lib
from bigvl.systems.m2_encoder import flops as m2_flops
from bigvl.systems.m2_encoder.system import M2EncoderSystem
from bigvl.systems.sycoca import config as sy_config
from bigvl.train.flops import layer_flops

PREDICTORS = ("embed_image", "embed_text", "caption", "tgmim_error", "select_patches")


class SyCoCaSystem(M2EncoderSystem):
  name = "sycoca"
  export_subtree = "towers"
  default_config = staticmethod(sy_config.default_config)

  @classmethod
  def validate(cls, config, *, check_paths: bool = True, training: bool = True) -> None:
    sy_config.validate(config, check_paths=check_paths, training=training)

  # ------------------------------------------------------------------ data
  def batch_spec(self, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    spec = super().batch_spec(global_batch)
    spec["lang"] = jax.ShapeDtypeStruct((global_batch,), jnp.int32)   # index into sycoca.LANGS
    return spec

  def fake_batch(self, global_batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    out = super().fake_batch(global_batch, seed)
    out["lang"] = (np.arange(global_batch) % len(sycoca.LANGS)).astype(np.int32)
    return out

  # ------------------------------------------------------------------ model
  def sycoca_config(self, towers=None) -> sycoca.SyCoCaConfig:
    m = self.config.model
    return sycoca.SyCoCaConfig(
        towers=towers or self.model_config(),
        decoder_depth=m.decoder_depth, decoder_width=m.decoder_width,
        decoder_heads=m.decoder_heads, decoder_mlp_dim=m.decoder_mlp_dim,
        caption_len=self.caption_steps(), mim_depth=m.mim_depth, mim_width=m.mim_width,
        mim_heads=m.mim_heads, mim_mlp_dim=m.mim_mlp_dim)

  def caption_steps(self) -> int:
    """Decoder positions: the language tag and the caption's tokens after [CLS], EOS included."""
    return (self.checkpoint_max_len or self.config.tokenizer.max_len) - 1

  def make_model(self, rngs: nnx.Rngs) -> sycoca.SyCoCa:
    return sycoca.SyCoCa(self.sycoca_config(), rngs=rngs)

  def make_eval_model(self, rngs: nnx.Rngs) -> sycoca.SyCoCa:
    return sycoca.SyCoCa(self.sycoca_config(self.eval_model_config()), rngs=rngs)

  # ------------------------------------------------------------------ loss
  @property
  def num_masked(self) -> int:
    return masking.num_masked(self.model_config().num_patches, self.config.loss.mask_ratio)

  def _needs_selection(self) -> bool:
    c = self.config.loss
    return c.mim_weight > 0 or (c.ic_weight > 0 and c.caption_context == "effective")

  def select(self, model: sycoca.SyCoCa, tokens, attention, ztxt, noise):
    """(masked, visible) patch indices by `loss.masking`; the masked ones are the effective ones."""
    rule = self.config.loss.masking
    scores = {"attention": lambda: attention,
              "similarity": lambda: model.patch_text_similarity(tokens, ztxt),
              "random": lambda: noise}[rule]()
    return masking.split_by_score(scores, self.num_masked)

  def caption_context(self, tokens: jax.Array, masked: jax.Array | None) -> jax.Array | None:
    """The image tokens the caption decoder may see: all, or CLS and the effective patches."""
    if self.config.loss.caption_context == "all" or masked is None:
      return None
    n = tokens.shape[1] - 1
    return jnp.concatenate([jnp.ones((tokens.shape[0], 1), bool),
                            masking.index_mask(masked, n)], axis=1)

  def caption_io(self, model: sycoca.SyCoCa, batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Decoder input (the language tag in [CLS]'s place), targets and their mask, (B, L - 1)."""
    ids, mask = batch["text"], batch["text_mask"]
    tag = model.cfg.lang_tag(batch["lang"].astype(jnp.int32))[:, None]
    return jnp.concatenate([tag, ids[:, 1:-1]], axis=1), ids[:, 1:], mask[:, 1:]

  def rows(self, model: sycoca.SyCoCa, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-example outputs; `batch["noise"]` (B, N) are the random-masking scores."""
    c = self.config.loss
    select = self._needs_selection()
    attention = None
    if select and c.masking == "attention":
      img, attention = model.image_tokens(batch["image"], cls_attention=True)
    else:
      img = model.image_tokens(batch["image"])
    txt = model.text_tokens(batch["text"], batch["text_mask"])
    out = {"zimg": model.image_embedding(img), "ztxt": model.text_embedding(txt)}
    masked = visible = None
    if select:
      masked, visible = self.select(model, img, attention, out["ztxt"], batch.get("noise"))
    if c.ic_weight > 0:
      dec_in, targets, tmask = self.caption_io(model, batch)
      logits = model.caption_logits(dec_in, img, self.caption_context(img, masked))
      out["ic_nll"], out["ic_tokens"], out["ic_correct"] = token_cross_entropy(
          logits, targets, tmask)
    if c.mim_weight > 0:
      pred = model.reconstruct(batch["image"], visible, txt, batch["text_mask"])
      out["mim"] = mim_loss.masked_patch_l2(pred, self.mim_target(batch["image"]), masked)
    return out

  def mim_target(self, images: jax.Array) -> jax.Array:
    return mim_loss.normalize_patches(mim_loss.patchify(normalize_pixels(images),
                                                        self.model_config().patch_size))

  def combine(self, model: sycoca.SyCoCa, rows: dict[str, jax.Array]):
    c = self.config.loss
    itc, aux = self.embedding_loss(model.towers, (rows["zimg"], rows["ztxt"]))
    aux = dict(aux, itc=itc)
    loss = c.itc_weight * itc
    if "ic_nll" in rows:
      tokens = jnp.maximum(rows["ic_tokens"].sum(), 1.0)
      ic = rows["ic_nll"].sum() / tokens
      aux.update(ic=ic, ic_token_acc=rows["ic_correct"].sum() / tokens)
      loss = loss + c.ic_weight * ic
    if "mim" in rows:
      aux["tgmim"] = rows["mim"].mean()
      loss = loss + c.mim_weight * aux["tgmim"]
    return loss, aux

  def _with_noise(self, batch, rng):
    n = self.model_config().num_patches
    return dict(batch, noise=jax.random.uniform(rng, (batch["image"].shape[0], n)))

  def loss(self, model, batch, rng):
    return self.combine(model, self.rows(model, self._with_noise(batch, rng)))

  def value_and_grad(self, graphdef, params, frozen, batch, rng):
    model = lambda p: nnx.merge(graphdef, p, frozen)
    return losses.accumulated_value_and_grad(
        lambda p, mb: self.rows(model(p), mb), lambda p, rows: self.combine(model(p), rows),
        params, self._with_noise(batch, rng), self.accum_steps,
        num_shards=mesh_lib.data_parallel_size(self.mesh, self.rules))

  def post_update(self, params, extra, step):
    params = dict(params)
    towers = dict(params["towers"])
    towers["logit_scale"] = jnp.minimum(towers["logit_scale"], self.config.loss.logit_scale_max)
    params["towers"] = towers
    return params, extra

  # ------------------------------------------------------------------ generation
  def generate(self, model: sycoca.SyCoCa, images: jax.Array, lang: jax.Array, *,
               beam: int | None = None, use_cache: bool = True) -> jax.Array:
    """Captions (B, L - 1) token ids, EOS then padding after the caption."""
    d = self.config.decode
    beam = beam or d.beam_size
    if self.config.loss.caption_context == "effective":
      tokens, attention = model.image_tokens(images, cls_attention=True)
      masked, _ = masking.split_by_score(attention, self.num_masked)
      ctx_mask = self.caption_context(tokens, masked)
    else:
      tokens, ctx_mask = model.image_tokens(images), None
    steps = self.caption_steps()
    tok = self.tokenizer
    first = model.cfg.lang_tag(lang.astype(jnp.int32))
    banned = (tok.cls_id, *(int(model.cfg.lang_tag(i)) for i in range(len(sycoca.LANGS))))
    if beam > 1:
      tokens = generate.repeat_rows(tokens, beam)
      ctx_mask = None if ctx_mask is None else generate.repeat_rows(ctx_mask, beam)
    n = tokens.shape[0]
    decoder = model.caption_decoder
    if use_cache:
      decoder.init_cache(n, steps, jnp.float32)
      graphdef, cache, rest = nnx.split(decoder, nnx.Cache, ...)
      step = generate.cached_step(graphdef, rest, context=tokens, context_mask=ctx_mask)
      state = cache
    else:
      step = generate.uncached_step(decoder, context=tokens, context_mask=ctx_mask)
      state = jnp.full((n, steps), tok.pad_id, jnp.int32)
    kw = dict(eos_id=tok.eos_id, pad_id=tok.pad_id, banned=banned)
    if beam == 1:
      return generate.greedy(step, state, first, steps, **kw)[0]
    return generate.beam_search(step, state, first, steps, beam=beam,
                                length_penalty=self.config.decode.length_penalty, **kw)[0]

  # ------------------------------------------------------------------ evaluation and reports
  def row_noise(self, index: jax.Array) -> jax.Array:
    """Random-masking scores of evaluation rows, fixed per row (whatever the batch or device)."""
    n = self.model_config().num_patches
    key = jax.random.key(0)
    return jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i), (n,)))(index)

  def _eval_selection(self, model, batch):
    rule = self.config.loss.masking
    if rule == "attention":
      img, attention = model.image_tokens(batch["image"], cls_attention=True)
    else:
      img, attention = model.image_tokens(batch["image"]), None
    ztxt = None
    if rule == "similarity":
      ztxt = model.text_embedding(model.text_tokens(batch["text"], batch["text_mask"]))
    return self.select(model, img, attention, ztxt, self.row_noise(batch["index"]))

  def predictors(self, graphdef) -> dict[str, Callable[[Any, dict], dict]]:
    def caption(p, b):
      return {"tokens": self.generate(nnx.merge(graphdef, p), b["image"], b["lang"])}

    def tgmim_error(p, b):
      """The masked patches' reconstruction error (B,) with the context text ctx_text; the
      patches are chosen with the picture's own text."""
      model = nnx.merge(graphdef, p)
      masked, visible = self._eval_selection(model, b)
      txt = model.text_tokens(b["ctx_text"], b["ctx_text_mask"])
      pred = model.reconstruct(b["image"], visible, txt, b["ctx_text_mask"])
      return {"error": mim_loss.masked_patch_l2(pred, self.mim_target(b["image"]), masked)}

    def select_patches(p, b):
      masked, _ = self._eval_selection(nnx.merge(graphdef, p), b)
      return {"masked": masking.index_mask(masked, self.model_config().num_patches)}

    return {
        "embed_image": lambda p, b: {
            "embedding": nnx.merge(graphdef, p).towers.encode_image(b["image"])},
        "embed_text": lambda p, b: {
            "embedding": nnx.merge(graphdef, p).towers.encode_text(b["text"], b["text_mask"])},
        "caption": caption,
        "tgmim_error": tgmim_error,
        "select_patches": select_patches,
    }

  def evaluators(self, only: Sequence[str] | None = None) -> dict[str, Any]:
    world_dir = self.data_dir if self.config.data.kind == "synthetic_world" else ""
    return eval_build.build_all(self.config.evals, tokenizer=self.tokenizer,
                                image_size=self.image_size(), world_dir=world_dir, only=only,
                                predictors=PREDICTORS)

  def forward_flops_by_part(self) -> dict[str, int]:
    """M²-Encoder's parts, the tower's second pass over the visible patches, and the decoders."""
    cfg = self.sycoca_config()
    t, c = cfg.towers, self.config.loss
    out = dict(m2_flops.forward_flops(t, self.config.tokenizer.max_len, self.contrastive_batch()))
    layers = t.depth + t.vl_depth
    steps = self.caption_steps()
    if c.ic_weight > 0:
      w, ctx = cfg.size("decoder_width"), t.num_patches + 1
      out["caption_decoder"] = cfg.decoder_depth * (
          layer_flops(steps, w, cfg.size("decoder_mlp_dim"))
          + 2 * steps * 2 * w * w + 2 * ctx * 2 * t.width * w + 2 * 2 * steps * ctx * w)
      out["caption_head"] = 2 * steps * w * cfg.caption_vocab
    if c.mim_weight > 0:
      visible = t.num_patches - self.num_masked + 1
      out["masked_pass"] = layers * layer_flops(visible, t.width, t.mlp_dim)
      w, n, txt = cfg.size("mim_width"), t.num_patches + 1, self.config.tokenizer.max_len
      out["image_decoder"] = cfg.mim_depth * (
          layer_flops(n, w, cfg.size("mim_mlp_dim"))
          + 2 * n * 2 * w * w + 2 * txt * 2 * t.width * w + 2 * 2 * n * txt * w) + (
          2 * n * w * t.patch_size ** 2 * 3 + 2 * visible * t.width * w)
    return out

  def flops_per_example(self) -> float:
    return 3 * sum(self.forward_flops_by_part().values())

  def describe(self) -> dict[str, Any]:
    c = self.config.loss
    return super().describe() | {
        "loss_weights": {"itc": c.itc_weight, "ic": c.ic_weight, "tgmim": c.mim_weight},
        "masking": c.masking, "mask_ratio": c.mask_ratio, "caption_context": c.caption_context}
