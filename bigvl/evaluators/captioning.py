"""Image captioning: generate a caption per image and language, score it against the references
with BLEU-4 and CIDEr-D as the COCO caption evaluation computes them (`caption_metrics`).

Sources: the embedded world (each held-out picture's five references per language), a COCO-style
`captions_*.json` ("coco:PATH": image ids, file names, several captions each; COCO-CN's Chinese
files have the same layout) and JSON lines ("jsonl:PATH", the retrieval format: {"image": …,
"caption": [...]}). Each language with references is scored over the images that have some in it.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np

from bigvl.evaluators import common

log = logging.getLogger("bigvl")
LANGS = ("en", "zh")   # bigvl.models.sycoca.LANGS: the index is the language tag the decoder gets


class CaptioningEvaluator:
  """Logs `{prefix}/{lang}/cider` and `{prefix}/{lang}/bleu4` per language; with `output`, every
  generated caption as a JSON line ({"index", "lang", "caption", "references"})."""

  requires = ("caption",)

  @classmethod
  def config_keys(cls) -> dict[str, Any]:
    return dict(langs_to_generate="",   # "" = every language that has references, e.g. "zh"
                output="")              # a JSON-lines file for the captions ("": none)

  @classmethod
  def validate_config(cls, name: str, entry: Mapping[str, Any]) -> None:
    langs = [s for s in entry.get("langs_to_generate", "").split(",") if s]
    bad = [s for s in langs if s not in LANGS]
    if bad:
      raise ValueError(f"evals.{name}.langs_to_generate: {bad} not in {list(LANGS)}")

  @classmethod
  def from_config(cls, name: str, entry: Mapping[str, Any], *, tokenizer, image_size: int,
                  world_dir: str = "") -> "CaptioningEvaluator":
    from bigvl.evaluators import kinds, sources
    where_kind, where = kinds.parse_source(entry.get("source", "world"))
    limit = entry.get("max_examples", 0)
    if where_kind == "world":
      data, metas = sources.world(world_dir, entry.get("split", "eval_heldout"), image_size, limit)
      refs = [[(lang, c) for lang in sorted(m.get("references", {}))
               for c in m["references"][lang]] or data.captions[i]
              for i, m in enumerate(metas)]
    elif where_kind == "coco":
      data = sources.coco_captions(where, image_size, entry.get("data_dir", ""), limit)
      refs = data.captions
    elif where_kind == "jsonl":
      data = sources.jsonl(where, image_size, entry.get("data_dir", ""), limit)
      refs = data.captions
    else:
      raise ValueError(f"evals.{name}: captioning reads 'world', 'coco:PATH' or 'jsonl:PATH', "
                       f"not {entry.get('source')!r}")
    if not refs or not all(refs):
      raise ValueError(f"evals.{name}: captioning needs at least one reference caption per image")
    langs = [s for s in entry.get("langs_to_generate", "").split(",") if s]
    return cls(images=data.images, references=refs, tokenizer=tokenizer, prefix=name,
               every=entry.get("every", 0), batch_size=entry.get("batch_size"),
               langs=langs or None, output=entry.get("output", ""))

  def __init__(self, *, images: np.ndarray | common.Rows,
               references: Sequence[Sequence[tuple[str, str]]], tokenizer, prefix="caption",
               every: int = 0, batch_size: int | None = None,
               langs: Sequence[str] | None = None, output: str = ""):
    self.images = images if isinstance(images, common.Rows) else common.Rows.of(image=images)
    if len(references) != len(self.images):
      raise ValueError(f"{len(references)} reference lists for {len(self.images)} images")
    self.references = [list(r) for r in references]
    have = sorted({lang for r in self.references for lang, _ in r} & set(LANGS))
    self.langs = [lang for lang in (langs or have) if lang in have]
    if not self.langs:
      raise ValueError(f"{prefix}: no references in {list(langs or LANGS)}")
    self.tokenizer, self.prefix, self.every = tokenizer, prefix, every
    self.batch_size, self.output = batch_size, output

  def generate(self, predictor: common.Predictor, lang: str,
               indices: np.ndarray | None = None) -> list[str]:
    """Captions in `lang` of the images (or of those at `indices`), in order."""
    idx = np.arange(len(self.images)) if indices is None else np.asarray(indices)
    code = LANGS.index(lang)
    rows = common.Rows(len(idx), lambda i: {**self.images.load(idx[i]),
                                            "lang": np.full(len(i), code, np.int32)})
    tokens = predictor.run("caption", rows, self.batch_size)["tokens"]
    return [self.tokenizer.decode(t) for t in tokens]

  def run(self, predictor: common.Predictor) -> dict[str, float]:
    from bigvl.evaluators import caption_metrics
    out: dict[str, float] = {}
    rows = []
    for lang in self.langs:
      idx = np.array([i for i, r in enumerate(self.references) if any(l == lang for l, _ in r)])
      texts = self.generate(predictor, lang, idx)
      refs = {int(i): [c for l, c in self.references[i] if l == lang] for i in idx}
      scores = caption_metrics.score_captions(dict(zip(map(int, idx), texts)), refs, lang)
      out[f"{self.prefix}/{lang}/cider"] = float(scores["cider"])
      out[f"{self.prefix}/{lang}/bleu4"] = float(scores["bleu4"])
      rows += [{"index": int(i), "lang": lang, "caption": t, "references": refs[int(i)]}
               for i, t in zip(idx, texts)]
      log.info("%s/%s: e.g. %r (references %r)", self.prefix, lang, texts[0], refs[int(idx[0])][:2])
    if self.output:
      import jax
      if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(self.output)), exist_ok=True)
        with open(self.output, "w", encoding="utf-8") as f:
          for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out
