"""SNP-S3's significant words (arXiv 2401.17773): the most frequent nouns, verbs and adjectives of the
pretraining captions, which MSSM masks and LVWM matches, laid on the tokenizer's pieces.

Mining (`mine`, `launch/significant_words.py`): every caption is split into words by the keyword
tagger DMAE uses (`bigvl.data.keywords`: jieba's part-of-speech tags for Chinese, the pluggable
English tagger), its content words (n*, v*, a*, not stop words) are counted, lower-cased, and
dropped when they are numbers, forms of "be" (是 in Chinese), or a single character; the `top`
most frequent are kept (ties by the word).

A word file holds one word per line: `word<TAB>count<TAB>group`. Words of one group are each
other's variants for MSSM's 10% replacement: mining groups English words by lemma (a light
suffix rule: moves / moved / moving → "mov"); `world_words()` — the checked default for the video
world — puts its colours, shapes, directions and actions each in their class, so that a variant of
"red" is another colour. A word alone in its group has no variant (the masker then draws any
significant piece, as BERT draws a random token).

On the pieces (`SignificantWords.token_flags`): a piece is significant when it overlaps a
significant word of the caption; `variant_table` gives, per piece id, the single-piece words of its
group, and the pool of every significant piece.
"""

from __future__ import annotations

import collections
import os
import re
from typing import Iterable, Sequence

import numpy as np

from bigvl.data import keywords

BE_FORMS = frozenset("be is are was were been being am 's 're 'm isn't aren't wasn't weren't "
                     "是 不是".split())
_NUMBER = re.compile(r"^[\d.,:/%+-]+$|^[零一二三四五六七八九十百千万两]+$")
_SUFFIXES = ("ing", "ed", "es", "s")


def lemma(word: str) -> str:
  """A light English lemma key: one suffix of ing / ed / es / s off (stems of at least 3 letters),
  then a final e (move, moves, moved, moving → mov). Other scripts: the word itself."""
  w = word.lower()
  if not w.isascii():
    return w
  for suffix in _SUFFIXES:
    if w.endswith(suffix) and len(w) - len(suffix) >= 3:
      w = w[:-len(suffix)]
      break
  return w[:-1] if w.endswith("e") and len(w) > 3 else w


def keep_word(word: str) -> bool:
  """Not a number, a form of "be" or a single character."""
  w = word.lower()
  return len(w) > 1 and w not in BE_FORMS and not _NUMBER.match(w)


def mine(captions: Iterable[str], *, top: int = 3000,
         tagger: keywords.KeywordTagger | None = None) -> list[tuple[str, int]]:
  """(word, count) of the `top` most frequent significant words of `captions`, most frequent
  first."""
  tagger = tagger or keywords.default_tagger()
  counts: collections.Counter[str] = collections.Counter()
  for text in captions:
    for word, content in tagger.tag(text):
      if content and keep_word(word):
        counts[word.lower()] += 1
  return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]


def write(path: str, words: Sequence[tuple[str, int]], groups: dict[str, str] | None = None
          ) -> None:
  """The word file: word, count and group (groups[word], default its lemma) per line."""
  groups = groups or {}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for word, count in words:
      f.write(f"{word}\t{count}\t{groups.get(word, 'lemma:' + lemma(word))}\n")
  os.replace(tmp, path)


def read(path: str) -> dict[str, str]:
  """word → group of a word file (a line of only a word: its lemma group). A malformed line is a
  one-line error naming the file and line."""
  out: dict[str, str] = {}
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      line = line.rstrip("\n")
      if not line.strip():
        continue
      parts = line.split("\t")
      if len(parts) not in (1, 3) or not parts[0].strip():
        raise ValueError(f"{path}:{n}: expected 'word<TAB>count<TAB>group' or a word, got "
                         f"{line!r}")
      word = parts[0].strip().lower()
      out[word] = parts[2] if len(parts) == 3 and parts[2] else "lemma:" + lemma(word)
  if not out:
    raise ValueError(f"{path}: no significant words")
  return out


def world_classes() -> dict[str, str]:
  """The video world's word classes (colour, shape, direction, action verbs), both languages."""
  from data_pipelines import synthetic_world as sw
  from data_pipelines import video_world as vw
  out: dict[str, str] = {}
  for c in sw.COLOURS:
    out[c["en"]] = out[c["zh"]] = "class:colour"
  for s in sw.SHAPES:
    out[s["en"]] = out[s["zh"]] = "class:shape"
  for lang, words in vw._DIRECTION_WORDS.items():
    for w in words.values():
      out[w] = "class:direction"
  verbs = {"appears", "shows", "disappears", "goes", "moves", "slides", "turns", "becomes",
           "出现", "消失", "不见", "移动", "变成"}
  for w in verbs:
    out[w] = "class:action"
  return {k.lower(): v for k, v in out.items()}


def world_words(seed: int = 0, num_clips: int = 2000, top: int = 3000) -> tuple[
    list[tuple[str, int]], dict[str, str]]:
  """The checked default for the video world: the significant words of its training captions and
  their groups (classes where the world has them, else lemmas)."""
  from data_pipelines import video_world as vw
  texts = []
  for i in range(num_clips):
    for caps in vw.captions(vw.clip_for(seed, "train", i)).values():
      texts.extend(caps)
  words = mine(texts, top=top)
  classes = world_classes()
  return words, {w: classes.get(w, "lemma:" + lemma(w)) for w, _ in words}


class SignificantWords:
  """A set of significant words (word → group) applied to captions and to a tokenizer."""

  def __init__(self, groups: dict[str, str], tagger: keywords.KeywordTagger | None = None):
    if not groups:
      raise ValueError("no significant words")
    self.groups = {w.lower(): g for w, g in groups.items()}
    self.tagger = tagger or keywords.default_tagger()

  @classmethod
  def from_file(cls, path: str) -> "SignificantWords":
    return cls(read(path))

  def spans(self, norm: str) -> list[tuple[int, int, bool]]:
    """The tagger's words of `norm`, each flagged significant or not."""
    return [(s, e, norm[s:e].lower() in self.groups)
            for s, e, _ in keywords.word_spans(norm, self.tagger)]

  def token_flags(self, tokenizer, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, mask, significant int32 (max_len,)): ids and mask are `tokenizer.encode(text)`; a
    piece is 1 when it overlaps a significant word."""
    norm = tokenizer.normalize(text)
    spans = self.spans(norm)
    ids, mask, slots = keywords.piece_words(tokenizer, norm, spans)
    flags = np.zeros((tokenizer.max_len,), np.int32)
    for i, hits in enumerate(slots):
      if hits and any(spans[h][2] for h in hits):
        flags[i] = 1
    return ids, mask, flags

  def variant_table(self, tokenizer, vocab_size: int, max_variants: int = 16
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(variants (V, K) int32, counts (V,) int32, pool (F,) int32): a piece id that is a whole
    significant word (as the tokenizer pieces the word alone) has the other whole-word pieces of
    its group as variants (at most K, the first by id); `pool` is every piece of every significant
    word."""
    by_group: dict[str, set[int]] = collections.defaultdict(set)
    pool: set[int] = set()
    for word, group in self.groups.items():
      ids, mask = tokenizer.encode(word)
      body = [int(i) for i in ids[1:int(mask.sum()) - 1]]
      pool.update(body)
      if len(body) == 1:
        by_group[group].add(body[0])
    variants = np.zeros((vocab_size, max_variants), np.int32)
    counts = np.zeros((vocab_size,), np.int32)
    for members in by_group.values():
      for pid in members:
        others = sorted(members - {pid})[:max_variants]
        if pid < vocab_size and others:
          variants[pid, :len(others)] = others
          counts[pid] = len(others)
    if not pool:
      raise ValueError("the tokenizer makes no pieces of the significant words")
    return variants, counts, np.asarray(sorted(pool), np.int32)
