"""The GLM-style SentencePiece text tokenizer used by M²-Encoder.

Reproduces what the reference evaluation feeds the model: the HF slow tokenizer
`GLMChineseTokenizer` (transformers 4.17) called with `padding="max_length",
truncation=True, max_length=52` on text that was lower-cased and had curly
double quotes straightened. Concretely, for one text:

1. optional normalisation: `lower()`, then `“`/`”` -> `"`;
2. split on the special tokens (`<|endoftext|>`, `[CLS]`, `[MASK]`, `[UNK]`)
   occurring in the text; each becomes its own id and the whitespace next to
   it is stripped (HF's default for special tokens);
3. in every other chunk, runs of 10 down to 2 spaces become `<|blank_n|>`
   (so 11 spaces are `<|blank_10|>` + one space), then SentencePiece encodes
   the chunk (each chunk gets its own dummy-prefix `▁`);
4. ids = `[CLS]` + pieces + `<|endoftext|>`; when longer than `max_len` the
   pieces are cut from the LEFT (HF `truncation_side="left"` on this class),
   i.e. the last `max_len - 2` pieces are kept;
5. right-pad with `<|endoftext|>` (pad == eos); mask 1 on real tokens.

Special ids are looked up in the model file, so the same class serves the GLM
model and the small models trained by `sp_train`.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Iterable, Sequence

import numpy as np
import sentencepiece as spm

EOS_PIECE = "<|endoftext|>"
CLS_PIECE = "[CLS]"
MASK_PIECE = "[MASK]"
UNK_PIECE = "[UNK]"
SEP_PIECE = "[SEP]"
MIN_BLANK, MAX_BLANK = 2, 10
BLANK_PIECES = tuple(f"<|blank_{n}|>" for n in range(MIN_BLANK, MAX_BLANK + 1))
# The HF tokenizer splits the text on these (its configured special tokens).
SPLIT_PIECES = (EOS_PIECE, CLS_PIECE, MASK_PIECE, UNK_PIECE)
REQUIRED_PIECES = SPLIT_PIECES + BLANK_PIECES
# Everything `sp_train` registers as user-defined symbols.
USER_DEFINED_PIECES = (EOS_PIECE, SEP_PIECE, CLS_PIECE, MASK_PIECE,
                       UNK_PIECE) + BLANK_PIECES

_SPLIT_RE = re.compile("(" + "|".join(re.escape(p) for p in SPLIT_PIECES) + ")")
_QUOTES = str.maketrans({"“": '"', "”": '"'})


def encode_whitespaces(text: str) -> str:
  """Replaces runs of 2..10 spaces by `<|blank_n|>`, longest runs first."""
  for n in range(MAX_BLANK, MIN_BLANK - 1, -1):
    text = text.replace(" " * n, f"<|blank_{n}|>")
  return text


def decode_whitespaces(text: str) -> str:
  for n in range(MAX_BLANK, MIN_BLANK - 1, -1):
    text = text.replace(f"<|blank_{n}|>", " " * n)
  return text


def split_special(text: str) -> list[str]:
  """Splits off special tokens, stripping whitespace beside them (as HF does)."""
  parts = _SPLIT_RE.split(text)
  # re.split with one group alternates text, special, text, ...
  for i in range(1, len(parts), 2):
    parts[i - 1] = parts[i - 1].rstrip()
    parts[i + 1] = parts[i + 1].lstrip()
  return [p for p in parts if p]


class GLMTokenizer:
  """Fixed-length GLM tokenizer; picklable (keeps the model proto, not the
  SentencePiece processor, which is rebuilt lazily after unpickling)."""

  def __init__(self, model_file: str, max_len: int = 52, lowercase: bool = True,
               straighten_quotes: bool = True):
    """Creates the tokenizer.

    Args:
      model_file: a SentencePiece model containing the GLM special pieces.
      max_len: output length including `[CLS]` and the final `<|endoftext|>`.
      lowercase: lower-case the text first (the reference evaluation does).
      straighten_quotes: map `“` and `”` to `"` (the reference evaluation does).
    """
    if max_len < 2:
      raise ValueError(f"max_len must be >= 2 for [CLS] and EOS, got {max_len}")
    self.model_file = str(model_file)
    self.max_len = max_len
    self.lowercase = lowercase
    self.straighten_quotes = straighten_quotes
    with open(self.model_file, "rb") as f:
      self._proto = f.read()
    self._sp: spm.SentencePieceProcessor | None = None
    sp = self.sp
    self.vocab_size = len(sp)
    ids = {}
    for piece in REQUIRED_PIECES:
      pid = sp.piece_to_id(piece)
      # A missing piece maps to <unk>; a piece that is only a normal vocab
      # entry would not be matched atomically inside text.
      if sp.id_to_piece(pid) != piece or sp.encode(piece)[-1:] != [pid]:
        raise ValueError(
            f"SentencePiece model {self.model_file} lacks the user-defined "
            f"piece {piece!r} required by GLMTokenizer")
      ids[piece] = pid
    self.cls_id = ids[CLS_PIECE]
    self.eos_id = ids[EOS_PIECE]
    self.pad_id = self.eos_id
    self.mask_id = ids[MASK_PIECE]
    self.unk_id = ids[UNK_PIECE]
    self._special_ids = {p: ids[p] for p in SPLIT_PIECES}

  @property
  def sp(self) -> spm.SentencePieceProcessor:
    if self._sp is None:
      self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    return self._sp

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_sp"] = None  # The SWIG processor cannot be pickled.
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)

  def as_written(self) -> "GLMTokenizer":
    """This tokenizer without lower-casing or quote straightening: evaluators prepare their text
    per task (the reference's retrieval script lower-cases, its zero-shot classifier does not)."""
    if not self.lowercase and not self.straighten_quotes:
      return self
    out = copy.copy(self)
    out.lowercase = out.straighten_quotes = False
    return out

  def normalize(self, text: str) -> str:
    if self.lowercase:
      text = text.lower()
    if self.straighten_quotes:
      text = text.translate(_QUOTES)
    return text

  def _piece_ids(self, text: str) -> list[int]:
    ids: list[int] = []
    for chunk in split_special(self.normalize(text)):
      special = self._special_ids.get(chunk)
      if special is not None:
        ids.append(special)
      else:
        ids.extend(self.sp.encode(encode_whitespaces(chunk)))
    return ids

  def pieces(self, text: str) -> list[str]:
    """The pieces of `text` without `[CLS]`/EOS, truncation or padding."""
    return [self.sp.id_to_piece(i) for i in self._piece_ids(text)]

  def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (ids, mask), both int32 of shape (max_len,)."""
    body = self._piece_ids(text)
    room = self.max_len - 2
    if len(body) > room:
      body = body[len(body) - room:]  # Left truncation, as the reference.
    seq = [self.cls_id] + body + [self.eos_id]
    ids = np.full((self.max_len,), self.pad_id, dtype=np.int32)
    ids[:len(seq)] = seq
    mask = np.zeros((self.max_len,), dtype=np.int32)
    mask[:len(seq)] = 1
    return ids, mask

  def encode_batch(self, texts: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """Returns (ids, mask), both int32 of shape (n, max_len)."""
    pairs = [self.encode(t) for t in texts]
    if not pairs:
      empty = np.zeros((0, self.max_len), dtype=np.int32)
      return empty, empty.copy()
    ids, masks = zip(*pairs)
    return np.stack(ids), np.stack(masks)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of one id sequence: drops a leading `[CLS]`, stops at EOS/pad."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if ids and ids[0] == self.cls_id:
      ids = ids[1:]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return decode_whitespaces(self.sp.decode(ids))
