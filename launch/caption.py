"""Caption images with a trained captioner (a SyCoCa run), in English or Chinese.

  python launch/caption.py --workdir=workdirs/sycoca_tiny --images='pics/*.jpg'
  python launch/caption.py --workdir=DIR --images='pics/*.png' --beam=4 --lang=zh --json=out.jsonl

Prints one line per image (path, tab, caption) and writes JSON lines to --json (default
WORKDIR/captions.jsonl), one per image: {"image": path, "lang": "en", "beam": 1, "caption": "…",
"step": N}. The run's own config (its config.json) fixes the model; generation is jitted, batched
and split over every device; --beam=1 is greedy decoding.
"""

import errno
import glob
import json
import logging as std_logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags, logging  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A captioner's training run (its latest "
                               "checkpoint, or --step).")
_IMAGES = flags.DEFINE_string("images", None, "A glob of image files (or one file).")
_BEAM = flags.DEFINE_integer("beam", None, "Beam size (1: greedy; default: the run's "
                             "decode.beam_size).")
_LANG = flags.DEFINE_enum("lang", None, ["en", "zh"], "Caption language (default: the run's "
                          "decode.lang).")
_STEP = flags.DEFINE_integer("step", None, "Which checkpoint (default: the latest).")
_JSON = flags.DEFINE_string("json", "", "JSON-lines output (default: WORKDIR/captions.jsonl).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per generation batch (global).")
flags.mark_flags_as_required(["workdir", "images"])


def image_files(pattern: str) -> list[str]:
  files = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else (
      [pattern] if os.path.isfile(pattern) else [])
  if not files:
    raise FileNotFoundError(errno.ENOENT, "no image matches --images", pattern)
  return files


def caption_files(workdir: str, files: list[str], *, beam: int | None = None,
                  lang: str | None = None, step: int | None = None,
                  batch_size: int = 64) -> list[dict]:
  """One {"image", "lang", "beam", "caption", "step"} per file, in order."""
  import numpy as np
  from bigvl.evaluators import common, sources
  from bigvl.models import sycoca
  from bigvl.train import evaluate
  overrides = {"decode.beam_size": beam} if beam else {}
  config = evaluate.run_config(workdir, **overrides)
  if "decode" not in config:
    raise ValueError(f"{workdir} is a {config.system!r} run, which does not caption: give a "
                     "SyCoCa run's workdir")
  lang = lang or config.decode.lang
  for i, path in enumerate(files):
    sources.check_image_file(path, f"--images file {i}")
  m = evaluate.load(config, workdir, step=step)
  size = m.system.image_size()
  code = sycoca.LANGS.index(lang)

  def load(idx):
    pixels = []
    for i in idx:
      with open(files[i], "rb") as f:
        pixels.append(sources.preprocess(f.read(), size))
    return {"image": np.stack(pixels), "lang": np.full(len(idx), code, np.int32)}

  tokens = m.predictor.run("caption", common.Rows(len(files), load), batch_size)["tokens"]
  return [{"image": path, "lang": lang, "beam": int(config.decode.beam_size),
           "caption": m.tokenizer.decode(t), "step": m.step} for path, t in zip(files, tokens)]


def main(argv):
  del argv
  import jax
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger("absl").setLevel(std_logging.WARNING)
  from bigvl import cli
  workdir = os.path.abspath(_WORKDIR.value)
  if not os.path.isfile(os.path.join(workdir, "config.json")):
    raise FileNotFoundError(errno.ENOENT, "not a training run (no config.json)", workdir)
  json_path = _JSON.value or os.path.join(workdir, "captions.jsonl")
  cli.check_writable(os.path.dirname(os.path.abspath(json_path)), f"{json_path} goes there")
  rows = caption_files(workdir, image_files(_IMAGES.value), beam=_BEAM.value, lang=_LANG.value,
                       step=_STEP.value, batch_size=_BATCH.value)
  if jax.process_index() == 0:
    with open(json_path, "w", encoding="utf-8") as f:
      for row in rows:
        print(f"{row['image']}\t{row['caption']}")
        f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
  from bigvl import cli  # noqa: E402
  cli.run_main(main, "caption.py")
