"""Writes text-only training data for the multi-label adapter ("text as image", arXiv
2312.04160): sentences that mention sampled sets of labels.

  python launch/generate_label_sentences.py --labels=labels.txt --out=sentences.jsonl
  python launch/generate_label_sentences.py --labels=labels.txt --out=s.jsonl \
      --model=/models/qwen2-0.5b-instruct --num=10000 --langs=en,zh --max_labels=4

--labels: one label a line, `english` or `english<TAB>chinese` (# comments, blank lines skipped).
Without --model, sentences come from bilingual templates (bigvl/data/label_sentences.py); with
--model, from a local Hugging Face causal LM directory (nothing is downloaded), and a sentence is
kept only if it mentions every label of its set (a set is asked again up to --max_tries times).
--num sentences in all, split evenly over --langs. Writes JSON lines {"text", "labels",
"label_ids", "lang"} (label_ids: 0-based, in labels-file order), prints progress to stderr on long
runs and one JSON line with the report to stdout; exits 1 if nothing was kept. Imports no jax.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from bigvl import cli  # noqa: E402
from bigvl.data import label_sentences as ls  # noqa: E402

_LABELS = flags.DEFINE_string("labels", None, "Labels file: `english` or `english<TAB>chinese` "
                              "per line.")
_OUT = flags.DEFINE_string("out", None, "Output JSON-lines file.")
_MODEL = flags.DEFINE_string("model", None, "A local Hugging Face causal LM directory (default: "
                             "the offline template generator).")
_NUM = flags.DEFINE_integer("num", 10000, "Sentences requested in all, split over --langs.")
_LANGS = flags.DEFINE_list("langs", ["en", "zh"], "Languages, comma-separated (en, zh).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the label sets and of sampling.")
_MIN_LABELS = flags.DEFINE_integer("min_labels", 1, "Fewest labels a sentence mentions.")
_MAX_LABELS = flags.DEFINE_integer("max_labels", 4, "Most labels a sentence mentions.")
_MAX_TRIES = flags.DEFINE_integer("max_tries", 5, "Times a label set is asked before it is given "
                                  "up.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 40, "--model: most tokens sampled per "
                                       "sentence.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "--model: sampling temperature.")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "--model: nucleus sampling mass.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "--model: prompts per generate call.")
_DEVICE = flags.DEFINE_string("device", "cpu", "--model: torch device (cpu, cuda, cuda:1, ...).")
_PROGRESS_EVERY = flags.DEFINE_float("progress_every", 10.0, "Seconds between progress lines.")
flags.mark_flags_as_required(["labels", "out"])


def _check_flags() -> None:
  """Refuses bad values before any work (one line, exit 1, via cli.run_main)."""
  if _NUM.value < 1:
    raise ValueError(f"--num={_NUM.value}: must be at least 1")
  bad = [lang for lang in _LANGS.value if lang not in ls.LANGS]
  if bad or not _LANGS.value or len(set(_LANGS.value)) != len(_LANGS.value):
    raise ValueError(f"--langs={','.join(_LANGS.value)}: give en, zh or en,zh")
  if not 1 <= _MIN_LABELS.value <= _MAX_LABELS.value:
    raise ValueError(f"--min_labels={_MIN_LABELS.value} --max_labels={_MAX_LABELS.value}: need "
                     "1 <= min_labels <= max_labels")
  if _MAX_TRIES.value < 1:
    raise ValueError(f"--max_tries={_MAX_TRIES.value}: must be at least 1")
  if _OUT.value.endswith(os.sep) or os.path.isdir(_OUT.value):
    raise IsADirectoryError(f"--out={_OUT.value}: a directory, give a file name")
  cli.check_writable(os.path.dirname(os.path.abspath(_OUT.value)), "--out")


class _Progress:
  """Prints a progress line to stderr at most every `every` seconds."""

  def __init__(self, every: float):
    self.every, self.start = every, time.monotonic()
    self.last = self.start

  def __call__(self, report: dict) -> None:
    now = time.monotonic()
    if now - self.last < self.every:
      return
    self.last = now
    prompted, kept = report["prompted"], report["kept"]
    print(f"generate_label_sentences.py: {kept}/{report['requested']} kept, {prompted} prompted "
          f"({kept / max(prompted, 1):.0%} kept), {prompted / (now - self.start):.1f} sentences/s",
          file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
  _check_flags()
  labels = ls.read_labels(_LABELS.value)
  start = time.monotonic()
  chunk_size = 256
  if _MODEL.value:
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    chunk_size = 4 * _BATCH_SIZE.value  # a progress report every few batches
    generator = ls.LMGenerator(
        _MODEL.value, seed=_SEED.value, max_new_tokens=_MAX_NEW_TOKENS.value,
        temperature=_TEMPERATURE.value, top_p=_TOP_P.value, device=_DEVICE.value,
        batch_size=_BATCH_SIZE.value)
  else:
    generator = ls.TemplateGenerator(seed=_SEED.value)
  loaded = time.monotonic()
  rows, report = ls.generate_sentences(
      labels, _NUM.value, generator, langs=_LANGS.value, seed=_SEED.value,
      min_labels=_MIN_LABELS.value, max_labels=_MAX_LABELS.value, max_tries=_MAX_TRIES.value,
      chunk_size=chunk_size, progress=_Progress(_PROGRESS_EVERY.value))
  seconds = time.monotonic() - loaded
  out = _OUT.value
  summary = {"out": out, "generator": _MODEL.value or "templates", **report,
             "kept_fraction": round(report["kept"] / max(report["prompted"], 1), 4),
             "seconds": round(time.monotonic() - start, 2),
             "sentences_per_s": round(report["prompted"] / max(seconds, 1e-9), 1)}
  if not rows:
    print(json.dumps(summary, ensure_ascii=False))
    print(f"generate_label_sentences.py: no sentence mentioned all of its labels "
          f"({report['prompted']} prompted): nothing written to {out}", file=sys.stderr)
    return 1
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = f"{out}.tmp{os.getpid()}"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  print(json.dumps(summary, ensure_ascii=False))
  if report["unfilled"]:
    print(f"generate_label_sentences.py: {report['unfilled']} of {report['requested']} label "
          f"sets got no sentence mentioning all their labels in {_MAX_TRIES.value} tries",
          file=sys.stderr)
  return 0


if __name__ == "__main__":
  cli.run_main(main, "generate_label_sentences.py")
