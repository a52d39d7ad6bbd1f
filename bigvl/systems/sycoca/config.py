"""SyCoCa's config keys: M²-Encoder's (towers, tokenizer, data, contrastive loss) plus the decoders,
the loss weights, the masking rule and decoding, and their validation."""

from __future__ import annotations

import ml_collections

from bigvl.evaluators import kinds
from bigvl.models import sycoca
from bigvl.systems.m2_encoder import config as m2_config
from bigvl.train import config_lib

ConfigError = config_lib.ConfigError


def default_config() -> ml_collections.ConfigDict:
  c = m2_config.default_config()
  # Decoder sizes; 0 takes the towers' width / heads / mlp_dim.
  c.model.update(dict(decoder_depth=2, decoder_width=0, decoder_heads=0, decoder_mlp_dim=0,
                      mim_depth=2, mim_width=0, mim_heads=0, mim_mlp_dim=0))
  c.loss.update(dict(
      itc_weight=1.0,
      ic_weight=2.0,              # CoCa's ITC:IC = 1:2
      mim_weight=1.0,
      masking="attention",        # which patches TG-MIM masks: the top mask_ratio "effective" ones
                                  # by "attention" (the image CLS's, last layer) or "similarity"
                                  # (patch–text cosine), or "random" (MAE's baseline)
      mask_ratio=0.25,
      caption_context="all",      # the caption decoder sees "all" image tokens or only CLS and
                                  # the "effective" (masked) patches
  ))
  c.decode = ml_collections.ConfigDict(dict(
      beam_size=1,                # 1: greedy
      length_penalty=0.0,         # beam ranking by log-prob / length^α (0: summed log-prob)
      lang="en",                  # the language launch/caption.py generates in by default
  ))
  E = kinds.eval_config
  c.evals.update(dict(
      caption=E(kind="captioning"),
      tgmim=E(kind="tgmim"),
      attn_mask=E(kind="attn_mask"),
  ))
  return c


def validate(c: ml_collections.ConfigDict, *, check_paths: bool = True,
             training: bool = True) -> None:
  m2_config.validate(c, check_paths=check_paths, training=training)

  def need(cond: bool, msg: str):
    if not cond:
      raise ConfigError(msg)
  need(c.loss.masking in sycoca.MASKING,
       f"loss.masking={c.loss.masking!r}: use one of {list(sycoca.MASKING)}")
  need(0.0 < c.loss.mask_ratio < 1.0, f"loss.mask_ratio={c.loss.mask_ratio}: in (0, 1)")
  need(c.loss.caption_context in ("all", "effective"),
       f"loss.caption_context={c.loss.caption_context!r}: use 'all' or 'effective'")
  # Generation has no text to rank patches by, and random patches are no "effective" ones.
  need(c.loss.caption_context == "all" or c.loss.masking == "attention",
       "loss.caption_context='effective' needs loss.masking='attention' (the picture's own CLS "
       "attention picks the patches a caption is generated from)")
  for key in ("itc_weight", "ic_weight", "mim_weight"):
    need(c.loss[key] >= 0, f"loss.{key}={c.loss[key]}: must be >= 0")
  need(c.decode.beam_size >= 1, f"decode.beam_size={c.decode.beam_size}: must be >= 1")
  need(c.decode.lang in sycoca.LANGS,
       f"decode.lang={c.decode.lang!r}: use one of {list(sycoca.LANGS)}")
  for key in ("decoder_depth", "mim_depth"):
    need(c.model[key] >= 1, f"model.{key}={c.model[key]}: must be >= 1")
