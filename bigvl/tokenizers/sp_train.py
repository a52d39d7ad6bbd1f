"""Trains small GLM-compatible SentencePiece models (for tests and toy runs).

The options mirror the GLM-10B-Chinese model's normaliser and trainer spec
(BPE, nmt_nfkc, dummy prefix, whitespace runs kept, digits split) so that
`glm.GLMTokenizer` treats both alike, but cover every character seen (coverage
1.0) since small Chinese corpora would otherwise map rare characters to <unk>.
Training is made deterministic: one thread, no input sampling or shuffling, so
the same sentences give a byte-identical model file.
"""

from __future__ import annotations

import io
import os
from typing import Iterable, Iterator

import sentencepiece as spm

from bigvl.tokenizers import glm


def _clean(sentences: Iterable[str]) -> Iterator[str]:
  for s in sentences:
    # SentencePiece reads one sentence per line.
    s = s.replace("\r", " ").replace("\n", " ")
    if s.strip():
      yield s


def train_sentencepiece(sentences: Iterable[str], out_file: str,
                        vocab_size: int) -> str:
  """Trains a BPE model holding the GLM special pieces; returns `out_file`.

  Args:
    sentences: training text, any languages.
    out_file: where the `.model` file is written (parent dirs are created).
    vocab_size: total pieces, including the special and user-defined ones; it
      must exceed the number of distinct characters plus the specials.
  """
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=_clean(sentences),
      model_writer=model,
      model_type="bpe",
      vocab_size=vocab_size,
      character_coverage=1.0,
      user_defined_symbols=list(glm.USER_DEFINED_PIECES),
      normalization_rule_name="nmt_nfkc",
      add_dummy_prefix=True,
      remove_extra_whitespaces=False,
      split_digits=True,
      byte_fallback=False,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      num_threads=1,
      input_sentence_size=0,
      shuffle_input_sentence=False,
      minloglevel=2,
  )
  parent = os.path.dirname(os.path.abspath(out_file))
  os.makedirs(parent, exist_ok=True)
  tmp = f"{out_file}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp, out_file)  # Readers never see a half-written model.
  return out_file
