"""DMAE's textual cue (arXiv 2309.11082): which words of a caption are keywords, the word weights
that follow (keywords 2, other words 1, normalised to sum 1), and those weights laid on the GLM
tokenizer's pieces, with the training augmentation that drops a few low-weight words.

A tagger splits a text into words — substrings of it, in order, whitespace left out — and says
which are keywords (`KeywordTagger`). The authors tag with spaCy: NOUN, ADJ or VERB and not a stop
word. Here:
  * Chinese: jieba's part-of-speech tags (`jieba.posseg`): n*, v* or a* and not a stop word, plus
    a small lexicon that is always a keyword (the video world's directions and positions, which
    jieba tags f or m). jieba is imported only when a Chinese text is tagged, with its logger
    quietened (it prints to stderr while it loads its dictionary). Latin words inside Chinese text
    get the English rule.
  * English: `EnglishTagger`, pluggable, whose default is a stop-word list and a lexicon of nouns,
    adjectives and verbs (the worlds' colours, shapes, sizes, positions and motions: moves,
    appears, disappears, becomes, left, right, up, down, ...). A lexicon word is a keyword even
    where the stop list has it ("up", "down"); a word in neither list counts as a keyword when it
    has a letter (an unknown word is more often a content word than a function word, and the stop
    list is meant to be complete for function words); punctuation and numbers are not keywords.
`default_tagger()` picks by script: text with Han characters is Chinese.

`token_weights` maps the words onto the tokenizer's pieces by character offsets (SentencePiece's
piece spans), so a piece takes the weight of the word it covers (a piece spanning two words, as
jieba's 消失 + 了 against the piece 消失了, the larger); specials, whitespace and padding weigh 0.
The authors' version of this (AntMMF prj/dmae_vtp ret_dataset.py) joins the WordPiece tokens
without spaces before tagging and compares tokens with single characters, so for English text it
marks almost nothing; and its word dropping joins the kept words without spaces. Neither is copied.
"""

from __future__ import annotations

import bisect
import logging
import re
from typing import Protocol, Sequence

import numpy as np

from bigvl.tokenizers import glm

KEYWORD, OTHER = 2.0, 1.0
_HAN = re.compile(r"[\u3400-\u9fff]")
_LETTER = re.compile(r"[^\W\d_]")
_EN_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*|\S")


class KeywordTagger(Protocol):
  def tag(self, text: str) -> list[tuple[str, bool]]:
    """(word, is_keyword) for the words of `text` in order, each a substring of it."""
    ...


# Function words. Not spaCy's list (which also stops "move", "show", "top", "side", ...): only
# words that carry no content in a caption.
EN_STOP_WORDS = frozenset("""
a an the this that these those there here such
i me my mine myself you your yours yourself he him his himself she her hers herself it its itself
we us our ours ourselves they them their theirs themselves one ones someone something anyone
anything everyone everything nobody nothing who whom whose which what whatever whichever
when where why how
all any both each either neither every few more most much many other others another some
no nor not only own same so than too very just also then once again further still already yet ever
even almost quite rather really perhaps maybe now soon later first last next
about above across after against along alongside among amongst around at before behind below
beneath beside besides between beyond by during except for from in inside into near of off on onto
out outside over past per since through throughout till to toward towards under underneath until
upon via with within without
and but or if because as while although though whether unless whereas however therefore thus
is are was were be been being am isn't aren't wasn't weren't
do does did doing done don't doesn't didn't
have has had having haven't hasn't hadn't
will would shall should can could may might must won't wouldn't can't cannot couldn't shouldn't
's 're 've 'll 'd n't
""".split())

# Always keywords: the synthetic and video worlds' vocabulary (data_pipelines/synthetic_world.py
# COLOURS, SHAPES, SIZES, POSITIONS; video_world.py's events and directions) and a few like them.
EN_LEXICON = frozenset("""
red green blue yellow purple orange pink cyan brown white black grey gray
colour colours color colors coloured colored
circle circles square squares triangle triangles cross crosses star stars heart hearts
shape shapes object objects video picture image frame
small little large big tiny huge
top bottom left right centre center middle corner side
up down away
move moves moving moved slide slides sliding slid
appear appears appearing appeared disappear disappears disappearing disappeared
show shows showing showed go goes going went
turn turns turning turned become becomes becoming became
change changes changing changed stay stays staying stayed
""".split())

# Content-tagged (n*, v*, a*) function words that carry nothing in a caption.
ZH_STOP_WORDS = frozenset("""
是 有 没有 为 成 要 会 能 可以 让 使 进行 做 来 去 说 叫 东西 时候 时 里 中 一个 个
""".split())

# Keywords whatever jieba tags them (it tags directions and positions f or m).
ZH_LEXICON = frozenset("""
红色 绿色 蓝色 黄色 紫色 橙色 粉色 青色 棕色 白色 黑色 灰色 颜色
圆形 正方形 三角形 十字形 形状
左 右 上 下 左上角 右上角 左下角 右下角 上方 下方 左侧 右侧 中央 中间
出现 消失 不见 移动 变成 改变 动
""".split())


class EnglishTagger:
  """Stop words + lexicon (see the module docstring); both replaceable."""

  def __init__(self, stop_words: frozenset[str] = EN_STOP_WORDS,
               lexicon: frozenset[str] = EN_LEXICON):
    self.stop_words = stop_words
    self.lexicon = lexicon

  def is_keyword(self, word: str) -> bool:
    w = word.lower().replace("’", "'")
    if w in self.lexicon:
      return True
    if w in self.stop_words:
      return False
    return bool(_LETTER.search(w))

  def tag(self, text: str) -> list[tuple[str, bool]]:
    return [(w, self.is_keyword(w)) for w in _EN_WORD.findall(text)]


def _jieba_posseg():
  import jieba
  jieba.setLogLevel(logging.WARNING)
  import jieba.posseg
  return jieba.posseg


class ChineseTagger:
  """jieba part-of-speech tags: n*, v*, a* and not a stop word, or in the lexicon."""

  def __init__(self, stop_words: frozenset[str] = ZH_STOP_WORDS,
               lexicon: frozenset[str] = ZH_LEXICON, english: KeywordTagger | None = None):
    self.stop_words = stop_words
    self.lexicon = lexicon
    self.english = english or EnglishTagger()

  def tag(self, text: str) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    for pair in _jieba_posseg().cut(text):
      word, flag = pair.word, pair.flag
      if not word.strip():
        continue
      if not _HAN.search(word) and _LETTER.search(word):
        out.extend(self.english.tag(word))
        continue
      keyword = word in self.lexicon or (flag[:1] in ("n", "v", "a")
                                          and word not in self.stop_words)
      out.append((word, keyword))
    return out


class BilingualTagger:
  """Chinese for text with Han characters, else English."""

  def __init__(self, english: KeywordTagger | None = None, chinese: KeywordTagger | None = None):
    self.english = english or EnglishTagger()
    self.chinese = chinese or ChineseTagger(english=self.english)

  def tag(self, text: str) -> list[tuple[str, bool]]:
    return (self.chinese if _HAN.search(text) else self.english).tag(text)


def default_tagger(english: KeywordTagger | None = None) -> BilingualTagger:
  return BilingualTagger(english=english)


def word_weights(text: str, tagger: KeywordTagger) -> list[tuple[str, float]]:
  """(word, weight) of every word: keywords 2, others 1, normalised to sum 1."""
  tags = tagger.tag(text)
  total = sum(KEYWORD if k else OTHER for _, k in tags)
  return [(w, (KEYWORD if k else OTHER) / total) for w, k in tags]


# --------------------------------------------------------------------------- pieces


Span = tuple[int, int, bool]       # [start, end) in the text, is_keyword


def word_spans(text: str, tagger: KeywordTagger) -> list[Span]:
  """The tagger's words located in `text` (a word not found after the previous one is skipped)."""
  spans: list[Span] = []
  pos = 0
  for word, keyword in tagger.tag(text):
    at = text.find(word, pos)
    if at < 0 or not word:
      continue
    spans.append((at, at + len(word), bool(keyword)))
    pos = at + len(word)
  return spans


def _encode_whitespaces(chunk: str) -> tuple[str, list[int]]:
  """`glm.encode_whitespaces(chunk)` and, for each of its characters (plus one past the end), the
  index in `chunk` it comes from."""
  out: list[str] = []
  src: list[int] = []
  i = 0
  while i < len(chunk):
    if chunk[i] != " ":
      out.append(chunk[i])
      src.append(i)
      i += 1
      continue
    j = i
    while j < len(chunk) and chunk[j] == " ":
      j += 1
    run = j - i
    groups = [glm.MAX_BLANK] * (run // glm.MAX_BLANK)
    if run % glm.MAX_BLANK:
      groups.append(run % glm.MAX_BLANK)
    k = i
    for n in groups:
      piece = f"<|blank_{n}|>" if n >= glm.MIN_BLANK else " " * n
      out.extend(piece)
      src.extend([k] * len(piece) if n >= glm.MIN_BLANK else range(k, k + n))
      k += n
    i = j
  src.append(len(chunk))
  return "".join(out), src


def piece_spans(tokenizer: glm.GLMTokenizer, text: str) -> list[tuple[int, int, int, str]]:
  """(id, start, end, kind) of the pieces `tokenizer` makes of `text` (already normalised),
  before [CLS], EOS and truncation; kind is "special", "blank" or "piece"; [start, end) in text."""
  out: list[tuple[int, int, int, str]] = []
  pos = 0
  for chunk in glm.split_special(text):
    at = text.find(chunk, pos)
    pos = at + len(chunk)
    if chunk in glm.SPLIT_PIECES:
      out.append((tokenizer.sp.piece_to_id(chunk), at, pos, "special"))
      continue
    enc, src = _encode_whitespaces(chunk)
    if enc != glm.encode_whitespaces(chunk):
      raise AssertionError(f"whitespace encoding disagrees with glm's on {chunk!r}")
    byte_at = [0]
    for ch in enc:
      byte_at.append(byte_at[-1] + len(ch.encode("utf-8")))
    for p in tokenizer.sp.encode(enc, out_type="proto").pieces:
      c0 = bisect.bisect_left(byte_at, p.begin)
      c1 = bisect.bisect_left(byte_at, p.end)
      kind = "blank" if p.piece in glm.BLANK_PIECES else "piece"
      out.append((p.id, at + src[c0], at + src[c1], kind))
  return out


def _drop_words(text: str, spans: list[Span], drop: int, rng: np.random.Generator
                ) -> tuple[str, list[Span]]:
  """Drops up to `drop` non-keyword words (at most half of all words), as many as rng draws
  uniformly from 0 to that bound, each with the whitespace before it (after it at the start)."""
  candidates = [i for i, (_, _, keyword) in enumerate(spans) if not keyword]
  most = min(drop, len(candidates), len(spans) // 2)
  n = int(rng.integers(0, most + 1)) if most > 0 else 0
  if n == 0:
    return text, spans
  chosen = set(int(i) for i in rng.choice(candidates, size=n, replace=False))
  keep = np.ones(len(text), bool)
  for i in chosen:
    s, e, _ = spans[i]
    cut = s
    while cut > 0 and text[cut - 1].isspace():
      cut -= 1
    if cut == 0:
      while e < len(text) and text[e].isspace():
        e += 1
    keep[cut:e] = False
  new_at = np.concatenate([[0], np.cumsum(keep)])
  new_text = "".join(ch for ch, k in zip(text, keep) if k)
  kept = [(int(new_at[s]), int(new_at[s]) + e - s, kw) for i, (s, e, kw) in enumerate(spans)
          if i not in chosen]
  return new_text, kept


def piece_words(tokenizer: glm.GLMTokenizer, norm: str, spans: Sequence[tuple[int, int, object]]
                ) -> tuple[np.ndarray, np.ndarray, list[list[int] | None]]:
  """`tokenizer.encode(norm)` (norm already normalised) and, for each of its max_len slots, the
  indices of the `spans` ([start, end) in norm, any payload) the slot's piece overlaps: [] for a
  piece of text no span covers, None for [CLS], EOS, specials, whitespace and padding. Pieces cut by
  left truncation are gone, as in `tokenizer.encode`."""
  starts = [s for s, _, _ in spans]
  ids_body, hits_body = [], []
  for pid, p0, p1, kind in piece_spans(tokenizer, norm):
    hits = None
    if kind == "piece":
      lo = max(bisect.bisect_right(starts, p0) - 1, 0)
      hits = [lo + i for i, (s, e, _) in enumerate(spans[lo:bisect.bisect_left(starts, p1)])
              if s < p1 and e > p0]
      if not hits and not norm[p0:p1].strip():
        hits = None
    ids_body.append(pid)
    hits_body.append(hits)
  room = tokenizer.max_len - 2
  if len(ids_body) > room:          # left truncation, as tokenizer.encode
    cut = len(ids_body) - room
    ids_body, hits_body = ids_body[cut:], hits_body[cut:]
  ids, mask = tokenizer.encode(norm)
  n = len(ids_body)
  if list(ids[1:n + 1]) != ids_body or int(mask.sum()) != n + 2:
    raise AssertionError(f"piece_words: pieces disagree with tokenizer.encode for {norm!r}")
  slots: list[list[int] | None] = [None] * tokenizer.max_len
  slots[1:n + 1] = hits_body
  return ids, mask, slots


def token_weights(tokenizer: glm.GLMTokenizer, text: str, tagger: KeywordTagger, *,
                  drop: int = 0, rng: np.random.Generator | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(ids, mask, weights) of a caption, ids and mask exactly `tokenizer.encode` of it (of what is
  left after dropping), weights float32 (max_len,) on the pieces: a piece weighs what its word does
  (2 keyword, 1 other), [CLS], EOS, specials, whitespace and padding 0, normalised to sum 1 over
  what survives left truncation (all 0 for an empty caption).

  drop > 0 with an rng: first drop up to `drop` non-keyword words, at most half of the words
  (DMAE's training augmentation; how many is drawn uniformly from 0 to that bound)."""
  norm = tokenizer.normalize(text)
  spans = word_spans(norm, tagger)
  if drop > 0 and rng is not None:
    norm, spans = _drop_words(norm, spans, drop, rng)
  ids, mask, slots = piece_words(tokenizer, norm, spans)
  weights = np.zeros((tokenizer.max_len,), np.float32)
  for i, hits in enumerate(slots):
    if hits is None:
      continue
    weights[i] = KEYWORD if any(spans[h][2] for h in hits) else OTHER
  total = weights.sum()
  return ids, mask, (weights / total if total > 0 else weights)
