"""BLEU-1..4 and CIDEr-D as the COCO caption evaluation (pycocoevalcap) computes them, without Java.

`bleu` and `cider_d` take tokenised captions (tokens joined by spaces, as pycocoevalcap does), keyed
by image: `res[key]` a one-caption list, `gts[key]` the references. `tokenize` prepares raw text:
English as COCO's PTBTokenizer does (Stanford CoreNLP 3.4.1 with -lowerCase, then its punctuation
tokens dropped), Chinese one token per character (as COCO-CN evaluations do), ASCII words whole.
The PTB rules are those ordinary captions meet: CoreNLP's lexer has more (odd run-together text,
rare abbreviations and a capital letter's period at a line's end can come out otherwise).

Facts carried over from pycocoevalcap 1.2: BLEU is corpus-level with the "closest" reference length
(ties: the shorter) and its smoothing (1e-15 on matches and the candidate's length, 1e-9 on guesses
and the reference length, so that nothing is 0/0); CIDEr-D takes document frequencies over the
evaluated set's references, n = 1..4 with equal weights, clips each candidate n-gram's tf-idf at
the reference's, multiplies by a Gaussian of the length difference (sigma = 6; the "length" is the
count of bigrams, as there), averages over references and multiplies by 10.
"""

from __future__ import annotations

import collections
import math
import re
import unicodedata
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np

# pycocoevalcap's PUNCTUATIONS. Its upper-case bracket names never match: -lowerCase turns "(" into
# "-lrb-", which COCO scores as a word. Kept so, for the same numbers.
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!",
                          ",", ":", "-", "--", "...", ";"])

# ------------------------------------------------------------------------------------- English
# A longest-match lexer (ties: the earlier rule), as CoreNLP's JFlex PTBLexer is, with the rules
# ordinary captions meet; checked against CoreNLP 3.4.1 itself. A rule is (pattern, output); where
# a group named t* took part, only it is consumed and the rest of the match is trailing context
# that still counts for the longest match, as in JFlex ("don't" is "do" + "n't", not "don" + "'t").
# Python's \w has "½" and "²" (numeric); CoreNLP's letters and digits do not.
_NUMERIC = "\u00b2\u00b3\u00b9\u00bc-\u00be\u2070-\u209f\u2150-\u218f\u2460-\u24ff\u2776-\u2793"
_L, _A = rf"[^\W\d_{_NUMERIC}]", rf"[^\W_{_NUMERIC}]"   # a letter, a letter or digit (any script)
_THING = rf"(?:[dol]'{_A})?{_A}+(?:[-_\u2010\u2011](?:[dol]'{_A})?{_A}+)*"   # "o'clock", "t-shirt"
# Abbreviations whose period stays on: always, capitalised only, before a number.
_ABBREV = (
    r"(?:ph|ed)\.d|mrs?|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|"
    "cpl|pvt|mt|capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|jr|sr|bros|blvd|rd|esq|"
    "inc|cos?|corp|ptys?|ltd|plc|bancorp|dept|bhd|assn|univ|intl|sys|invt|elec|natl|m[ft]g|ph|tel|"
    "est|ext|sq|ft|jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|tues?|wed|thu|thurs|fri|ala|"
    "ariz|calif|colo|conn|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb|nev|okla|penn|tenn|va|"
    "vt|wisc?|wyo|etc|al|seq|vs|cf|alex|wm|jos|cie|treas")
_ABBREV_CAPITAL = "Miss|Ark|Del|Ill|La|Mass|Ore|Pa|Tex|Wash"
_ABBREV_NUMBER = "nos?|prop|figs?|art|op|pp|ca"
# A capital letter's period is a sentence end before these ("letter A. The" → "a", ".").
_STARTERS = ("About|According|Additionally|After|An|A|As|At|But|Earlier|He|Her|Here|However|If|In|"
             r"It|Last|Many|More|Mr\.|Ms\.|Now|Once|One|Other|Our|She|Since|So|Some|Such|That|The|"
             "Then|There|These|They|This|We|When|While|What|Yet|You")
_APOWORDS = (rf"'n'?|'em|'[2-9]0s|'till?|'cause|[ldj]'|n'{_L}{{2,}}|{_L}+[aeiouy]'[aeiou]{_L}*|"
             r"li'l|c'mon|e'er|s'mores|ev'ry|nat'l|nor'easter|cont'd\.?")
_QUOTES = str.maketrans({"\u2018": "`", "\u201b": "`", "\u2039": "`", "\u203a": "'",
                         "\u201c": "``", "\u00ab": "``", "\u201d": "''", "\u00bb": "''"})
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SYMBOLS = {"\u00a2": "cents", "\u00a3": "#", "\u00a4": "$", "\u20ac": "$", "\u00bc": "1/4",
            "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_URL_END = r"[^\s\"<>|.!?(){},-]"


def _head(m: re.Match) -> str:
  """What a match consumes: its group named t* that took part, else all of it."""
  return next((v for k, v in m.groupdict().items() if k.startswith("t") and v is not None),
              m.group())


def _keep(m: re.Match) -> list[str]:
  return [_head(m)]


def _nbsp(m: re.Match) -> list[str]:
  # CoreNLP keeps "1 1/2" one token with a no-break space, which pycocoevalcap's split(" ") keeps.
  return [re.sub(r"\s", "\u00a0", m.group()).replace("(", "-lrb-").replace(")", "-rrb-")]


def _as(*tokens: str) -> Callable[[re.Match], list[str]]:
  return lambda m: list(tokens)


_RULES: list[tuple[re.Pattern, Callable[[re.Match], list[str]]]] = [
    (re.compile(p, re.I), f) for p, f in [
        # Spaces, controls, and characters beyond the BMP (emoji), which CoreNLP deletes.
        (r"[\s\u200b\u200e\u200f\ufeff\x00-\x1f\x7f]+|[\U00010000-\U0010ffff]", _as()),
        (r"</?[a-z!][^>]*>", _keep),                                         # SGML tag
        (rf"https?://[^\s\"<>|()]+{_URL_END}", _keep),
        (r"(?:www\.(?:[^\s\"<>|.!?(){},]+\.)+[a-z]{2,4}|"
         r"(?:[^\s\"`'<>|.!?(){},\-_$]+\.)+(?:com|net|org|edu))"
         rf"(?:/[^\s\"<>|()]+{_URL_END})?", _keep),
        (r"[a-z0-9][^\s\"<>|()]*@(?:[^\s\"<>|().]+\.)+[a-z]{2,4}", _keep),  # e-mail
        (r"(?P<t>can)not|(?P<t2>gon|wan)na|(?P<t3>got)ta|(?P<t4>lem|gim)me", _keep),
        (rf"(?P<t>{_L}+)'(?:[smd]|re|ve|ll)", _keep),                        # "dog" + "'s"
        (r"(?P<t>[a-z]*[a-mo-z])n't", _keep),                                # "do" + "n't"
        (rf"{_L}+", _keep),
        (rf"{_APOWORDS}|(?P<t>y'){_L}|(?P<t2>'t)(?:is|was)\b", _keep),     # "'em", "y'" + "all"
        (r"(?P<t>'\d\d)\s", _keep),                                          # "'10"
        (r"[-+]?(?:\d*(?:[.:,]\d+)+|\d+)", _keep),                           # number
        (r"(?:\d{1,4}[- \u00a0])?\d{1,4}/\d{1,4}", _nbsp),                  # fraction
        (r"(?:\(\d{3}\)[ \u00a0]?|\d{3}[- \u00a0.])\d{3}[- \u00a0.]\d{4}", _nbsp),   # phone
        (r"[a-z0-9][a-z0-9.,]*(?:-(?:[a-z](?:\.[a-z])+\.|[a-z0-9]+))+", _keep),  # "3.5-inch"
        (_THING, _keep),
        (rf"(?P<t>{_THING}\.)[,;:]", _keep),                # the period stays before , ; :
        (r"[a-z0-9]+(?:-[a-z]+){0,2}(?:/[a-z0-9]+(?:-[a-z]+){0,2}){1,2}", _keep),  # "and/or"
        (r"(?-i:[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+)", lambda m: [m.group().replace("&amp;", "&")]),
        (rf"{_L}+(?:\.{_L}+)+", _keep),                                      # "a.m", "x.com"
        (rf"[a-z](?:\.[a-z])+\.|(?:{_ABBREV})\.|(?-i:(?:{_ABBREV_CAPITAL})\.)|"
         rf"(?:{_ABBREV_NUMBER})\.(?=[ \u00a0]?\d)", _keep),                # "u.s.", "mr."
        (rf"[a-z]\.(?![ \u00a0]+(?-i:{_STARTERS})[ \u00a0])", _keep),       # "plan b."
        (r"\.{3,5}|(?:\.[ \u00a0]){2,4}\.|\u2026", _as("...")),
        (r"-+", lambda m: ["--" if len(m.group()) in (3, 4) else m.group()]),
        (r"[\u2013\u2014\u2015]", _as("--")),
        (r"[?!]+|[,;:.]|\*+|#+|@+|_+|[a-z]*\$", _keep),                     # "!!!" is a word
        (rf"#{_L}+|@[^\W\d]+", _keep),                                       # "#tag", "@name"
        (r"&amp;", _as("&")),
        (r"\"", _as("''")),
        (r"''|'|[`\u2018\u201a\u201b\u201c\u201d\u201e\u201f\u2039\u203a\u00ab\u00bb]{1,2}",
         lambda m: [m.group().translate(_QUOTES)]),
        (r"(?P<t>'(?:[smd]|re|ve|ll))(?:[^a-z]|$)|n't", _keep),             # lone clitic
        (r"(?P<t>')[a-z][^ \t\n\r\u00a0]", _as("`")),                       # opening quote
        (r"[()\[\]{}]", lambda m: [_BRACKETS[m.group()]]),
        (r".", lambda m: [_SYMBOLS.get(m.group(), m.group())]),
    ]]
# Most of a caption is plain words between spaces, which no rule lexes otherwise: the fast path.
_PLAIN = re.compile(rf"\s+|{_L}+(?=\s|$)")
_SPLIT = frozenset(["cannot", "gonna", "wanna", "gotta", "lemme", "gimme"])


def _ptb(text: str) -> list[str]:
  text = text.replace("\u2019", "'")   # CoreNLP reads it as an apostrophe ("don’t" → "do n't")
  tokens: list[str] = []
  pos = 0
  while pos < len(text):
    m = _PLAIN.match(text, pos)
    if m and m.group().lower() not in _SPLIT:
      if not m.group().isspace():
        tokens.append(m.group().lower())
      pos = m.end()
      continue
    best, action = None, None
    for pattern, act in _RULES:
      m = pattern.match(text, pos)
      if m and m.end() > pos and (best is None or m.end() > best.end()):
        best, action = m, act
    tokens += [t.lower() for t in action(best)]
    pos += len(_head(best))
  return [t for t in tokens if t not in PUNCTUATIONS]


# ------------------------------------------------------------------------------------- Chinese
_CJK = ("\u2e80-\u2fdf\u3005-\u3007\u3021-\u3029\u3040-\u30ff\u3100-\u312f\u31a0-\u31ff"
        "\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003134f")
# A CJK character, a decimal number, or a run of other letters and digits ("t恤" → "t", "恤");
# whatever else (spaces, punctuation, symbols) separates tokens and is dropped.
_ZH_TOKEN = re.compile(rf"[{_CJK}]|\d+(?:\.\d+)+|(?:(?![{_CJK}])[^\W_])+")


def tokenize(text: str, lang: str) -> list[str]:
  """Tokens of one caption: characters for "zh", COCO's PTB tokenisation otherwise ("en")."""
  if lang == "zh":
    # NFKC: full-width letters, digits and punctuation become ASCII ("ＴＶ１２" → "tv12").
    return _ZH_TOKEN.findall(unicodedata.normalize("NFKC", text).lower())
  return _ptb(text)


# ------------------------------------------------------------------------------------- metrics
def _ngrams(words: Sequence[str], n: int) -> collections.Counter:
  return collections.Counter(tuple(words[i:i + k]) for k in range(1, n + 1)
                             for i in range(len(words) - k + 1))


def _keys(res: Mapping, gts: Mapping) -> list:
  if set(res) != set(gts):
    odd = next(iter(set(res) ^ set(gts)))
    raise ValueError(f"candidates and references are for different images, e.g. {odd!r}")
  if not gts:
    raise ValueError("no captions to score")
  bad = [k for k in gts if len(res[k]) != 1 or not gts[k]]
  if bad:
    raise ValueError(f"image {bad[0]!r}: needs one candidate and at least one reference")
  return list(gts)


def bleu(res: Mapping[Hashable, Sequence[str]], gts: Mapping[Hashable, Sequence[str]],
         n: int = 4) -> tuple[list[float], list[list[float]]]:
  """(corpus BLEU-1..n, per image BLEU-1..n: `per[k][i]` is BLEU-(k+1) of the i-th key)."""
  tiny, small = 1e-15, 1e-9   # pycocoevalcap's: no match stays (almost) zero, never 0/0
  keys = _keys(res, gts)
  guess, correct = np.zeros((len(keys), n)), np.zeros((len(keys), n))
  hyp_len, ref_len = np.zeros(len(keys)), np.zeros(len(keys))
  for i, key in enumerate(keys):
    hyp = res[key][0].split()
    refs = [r.split() for r in gts[key]]
    clip: collections.Counter = collections.Counter()
    for r in refs:
      clip |= _ngrams(r, n)    # | keeps the largest count of each n-gram over the references
    for gram, count in _ngrams(hyp, n).items():
      correct[i, len(gram) - 1] += min(count, clip[gram])
    guess[i] = [max(0, len(hyp) - k) for k in range(n)]
    hyp_len[i] = len(hyp)
    ref_len[i] = min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]   # closest, then shorter

  def score(c, g, h, r):
    b = np.cumprod((c + tiny) / (g + small), axis=-1) ** (1.0 / np.arange(1, n + 1))
    ratio = (h + tiny) / (r + small)
    penalty = np.where(ratio < 1, np.exp(1 - 1 / ratio), 1.0)
    return b * np.expand_dims(penalty, -1)

  corpus = score(correct.sum(0), guess.sum(0), hyp_len.sum(), ref_len.sum())
  per = score(correct, guess, hyp_len, ref_len)
  return [float(x) for x in corpus], per.T.tolist()


def cider_d(res: Mapping[Hashable, Sequence[str]], gts: Mapping[Hashable, Sequence[str]],
            n: int = 4, sigma: float = 6.0) -> tuple[float, np.ndarray]:
  """(mean CIDEr-D, per image CIDEr-D in the order of `gts`' keys)."""
  keys = _keys(res, gts)
  tests = [_ngrams(res[k][0].split(), n) for k in keys]
  refs = [[_ngrams(r.split(), n) for r in gts[k]] for k in keys]
  df: collections.Counter = collections.Counter()
  for rs in refs:
    df.update(set().union(*rs))    # an n-gram counts once per image, however many references
  log_images = math.log(len(keys))

  def tfidf(counts):
    """Per n: {n-gram: tf-idf}, its norm; and the length, the count of bigrams."""
    vecs = [{} for _ in range(n)]
    for gram, tf in counts.items():
      vecs[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, df[gram])))
    norms = [math.sqrt(sum(v * v for v in vec.values())) for vec in vecs]
    return vecs, norms, sum(counts[g] for g in vecs[1]) if n > 1 else 0

  scores = np.zeros(len(keys))
  for i, (test, rs) in enumerate(zip(tests, refs)):
    hv, hn, hl = tfidf(test)
    total = np.zeros(n)
    for r in rs:
      rv, rn, rl = tfidf(r)
      for k in range(n):
        dot = sum(min(x, rv[k].get(g, 0.0)) * rv[k].get(g, 0.0) for g, x in hv[k].items())
        total[k] += (dot / (hn[k] * rn[k]) if hn[k] and rn[k] else dot) * math.exp(
            -((hl - rl) ** 2) / (2 * sigma ** 2))
    scores[i] = total.mean() / len(rs) * 10.0
  return float(scores.mean()), scores


def score_captions(predictions: Mapping[Hashable, str],
                   references: Mapping[Hashable, Sequence[str]], lang: str) -> dict[str, float]:
  """{"bleu1".."bleu4", "cider"} of raw-text predictions against raw-text references, over the
  images of `references` (each needs a prediction)."""
  missing = [k for k in references if k not in predictions]
  if missing:
    raise ValueError(f"no prediction for {len(missing)} image(s), e.g. {missing[0]!r}")
  res = {k: [" ".join(tokenize(predictions[k], lang))] for k in references}
  gts = {k: [" ".join(tokenize(r, lang)) for r in refs] for k, refs in references.items()}
  b, _ = bleu(res, gts)
  out = {f"bleu{k + 1}": v for k, v in enumerate(b)}
  out["cider"] = cider_d(res, gts)[0]
  return out
