"""VQA accuracy as the official VQA evaluation (vqaEval.py of the VQA API) computes it: its answer
normalisation and its soft, leave-one-out accuracy over the ten human answers.

`normalize_answer` applies, in the official order:
  1. newlines and tabs to spaces, surrounding whitespace stripped;
  2. punctuation: each of ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! is deleted where the answer has
     that mark next to a space (or has a comma between two digits anywhere, as "1,000"), and
     otherwise replaced by a space ("black/white" -> "black white", "1,000" -> "1000"); then every
     period not followed by a digit is deleted ("u.s." -> "us", "2.5" stays). Apostrophes and
     colons are kept. (The official period pattern means "not between digits" but, as written,
     only looks ahead; that is kept, and so are its numbers.)
  3. lowercase, split on whitespace, number words to digits ("none"/"zero" -> "0", "one" -> "1" ..
     "ten" -> "10"), articles a/an/the dropped, apostrophe-less contractions restored ("dont" ->
     "don't", from a table of the common ones), words joined by single spaces.

`soft_accuracy` with n >= 2 answers is the mean over the n leave-one-out subsets of
min(1, matches among the other n - 1 / 3); with one answer, exact match. Accuracies are fractions
in [0, 1] (the official script prints percentages).

Decision: the prediction and every human answer go through the whole of `normalize_answer`. The
official script normalises the prediction only when the ten answers are not all equal, and the
human answers with step 2 only (the released answers are already normalised); the two agree except
that the official one scores an unnormalised prediction ("Two" against ten "2") as wrong on
unanimous questions.
"""

from __future__ import annotations

import re
from typing import Sequence

_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!")
_COMMA_IN_NUMBER = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset(("a", "an", "the"))
# Words that are only ever a contraction missing its apostrophe (so not "hell", "well", "its").
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldntve": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "im": "i'm", "ive": "i've",
    "isnt": "isn't", "itd": "it'd", "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "oclock": "o'clock", "shant": "shan't", "shes": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "somebodys": "somebody's", "someones": "someone's",
    "thats": "that's", "thered": "there'd", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "wasnt": "wasn't", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "yall": "y'all", "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've",
}


def _punctuation(text: str) -> str:
  """Step 2 of `normalize_answer`: punctuation marks deleted or spaced, then periods."""
  out = text
  delete_all = _COMMA_IN_NUMBER.search(text) is not None
  for mark in _PUNCT:
    # The test looks at the original text, the replacement at the text so far (as officially).
    if delete_all or mark + " " in text or " " + mark in text:
      out = out.replace(mark, "")
    else:
      out = out.replace(mark, " ")
  return _PERIOD.sub("", out)


def _words(text: str) -> str:
  """Step 3 of `normalize_answer`: lowercase, digits for number words, no articles, contractions."""
  words = [_NUMBERS.get(w, w) for w in text.lower().split()]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(s: str) -> str:
  """The official VQA normal form of an answer ("Two dogs." -> "2 dogs", "dont" -> "don't")."""
  if not isinstance(s, str):
    raise ValueError(f"an answer must be a string, got {type(s).__name__}")
  return _words(_punctuation(s.replace("\n", " ").replace("\t", " ").strip()))


def soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """VQA accuracy of one prediction against the human answers (both normalised).

  Args:
    prediction: the model's answer.
    answers: the human answers (10 in VQAv2); one answer scores by exact match.
  Returns:
    With m of n answers matching: (m min(1, (m-1)/3) + (n-m) min(1, m/3)) / n, the mean over the
    n leave-one-out subsets of min(1, matches / 3); 3 of 10 matching gives 0.9, 4 or more 1.0.
  """
  if isinstance(answers, str) or not len(answers):
    raise ValueError(f"answers must be a non-empty list of strings, got {answers!r:.80}")
  pred = normalize_answer(prediction)
  matches = [normalize_answer(a) == pred for a in answers]
  n, m = len(matches), sum(matches)
  if n == 1:
    return float(m)
  return (m * min(1.0, (m - 1) / 3) + (n - m) * min(1.0, m / 3)) / n


def vqa_accuracy(predictions: Sequence[str], answer_lists: Sequence[Sequence[str]]) -> float:
  """Mean `soft_accuracy` over questions (predictions[i] against answer_lists[i])."""
  if len(predictions) != len(answer_lists):
    raise ValueError(f"{len(predictions)} predictions for {len(answer_lists)} answer lists")
  if not len(predictions):
    raise ValueError("no predictions to score")
  return sum(soft_accuracy(p, a) for p, a in zip(predictions, answer_lists)) / len(predictions)
