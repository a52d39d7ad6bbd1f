"""Mines SNP-S3's significant words (arXiv 2401.17773) from pretraining captions: the most frequent
nouns, verbs and adjectives (numbers, forms of "be" and single characters dropped), tagged by
jieba's part-of-speech tags for Chinese and the pluggable English tagger of bigvl.data.keywords.

  python launch/significant_words.py --input=CAPTIONS --top=3000 --out=FILE

CAPTIONS: a text file of one caption a line, a JSON-lines file whose lines hold "caption" (a string
or a list of strings) or "text", or an MSR-VTT *_videodatainfo.json (its "sentences"). Several
inputs may be given comma-separated. FILE: one word a line, `word<TAB>count<TAB>group` (the group:
the word's lemma; words of a group are MSSM's variants of each other), which
`--config.data.significant_words=FILE` reads. Prints one JSON line {"out", "captions", "words",
"top_words", "seconds"}; a missing or unreadable input is one line on stderr and exit status 1.
Imports no jax.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from bigvl import cli  # noqa: E402
from bigvl.data import significant  # noqa: E402

_INPUT = flags.DEFINE_list("input", None, "Caption files (text lines, JSON lines or MSR-VTT JSON).")
_TOP = flags.DEFINE_integer("top", 3000, "How many of the most frequent words to keep.")
_OUT = flags.DEFINE_string("out", None, "The word file to write.")


def read_captions(path: str):
  """The captions of one input file (see the module docstring), in order."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--input {path}: no such file")
  if path.endswith(".json"):
    with open(path, encoding="utf-8") as f:
      doc = json.load(f)
    sentences = doc.get("sentences") if isinstance(doc, dict) else None
    if not isinstance(sentences, list):
      raise ValueError(f"--input {path}: a .json input must be an MSR-VTT videodatainfo file "
                       "(with 'sentences')")
    for s in sentences:
      if isinstance(s, dict) and isinstance(s.get("caption"), str):
        yield s["caption"]
    return
  with open(path, encoding="utf-8-sig") as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      if path.endswith(".jsonl"):
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"--input {path}:{n}: not JSON ({e.msg})") from None
        value = row.get("caption", row.get("text")) if isinstance(row, dict) else None
        texts = value if isinstance(value, list) else [value]
        if not all(isinstance(t, str) for t in texts):
          raise ValueError(f"--input {path}:{n}: no string 'caption' or 'text'")
        yield from texts
      else:
        yield line


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
  if not _INPUT.value or not _OUT.value:
    raise ValueError("--input and --out are required")
  if _TOP.value < 1:
    raise ValueError(f"--top={_TOP.value}: must be >= 1")
  start = time.monotonic()
  count = 0

  def captions():
    nonlocal count
    for path in _INPUT.value:
      for text in read_captions(path):
        count += 1
        yield text
  words = significant.mine(captions(), top=_TOP.value)
  if not words:
    raise ValueError(f"no significant word in {count} captions of {','.join(_INPUT.value)}")
  significant.write(_OUT.value, words)
  print(json.dumps({"out": _OUT.value, "captions": count, "words": len(words),
                    "top_words": [w for w, _ in words[:10]],
                    "seconds": round(time.monotonic() - start, 2)}, ensure_ascii=False))
  return 0


if __name__ == "__main__":
  cli.run_main(main, "significant_words.py")
