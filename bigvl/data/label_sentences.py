"""Text-only training data for the "text-as-image" multi-label adapter (arXiv 2312.04160).

The adapter learns from sentences that mention several labels, standing in for images: a label
set is sampled, a generator writes a sentence about it, and the sentence is kept only if it
mentions every label of the set. Two generators: `TemplateGenerator` (offline, bilingual
templates, every sentence mentions its labels) and `LMGenerator` (a local Hugging Face causal
language model, prompted with the label names). `generate_sentences` runs either and filters.

Labels file (`read_labels`): one label a line, `english` or `english<TAB>chinese`; blank lines and
lines starting with `#` are skipped. A label without a Chinese name is never used for Chinese.

Nothing here imports jax or torch at module level; `LMGenerator` imports torch and transformers
when it is built.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
import re
from typing import Callable, Iterable, Mapping, Protocol, Sequence

LANGS = ("en", "zh")

# Default templates: "{list}" is replaced by the joined label names ("a red circle and a blue
# square"; "红色圆形和蓝色正方形"). Callers may pass their own set of the same shape.
TEMPLATES: dict[str, list[str]] = {
    "en": [
        "a photo of {list}.",
        "there is {list} in the picture.",
        "an image showing {list}.",
        "a picture with {list}.",
        "this photo shows {list}.",
        "a close-up photo of {list}.",
        "a scene containing {list}.",
        "{list} in a photo.",
    ],
    "zh": [
        "一张有{list}的照片。",
        "图中有{list}。",
        "这张图片里有{list}。",
        "照片上是{list}。",
        "画面中可以看到{list}。",
        "一幅包含{list}的图像。",
    ],
}

# Prompts of `LMGenerator`: "{labels}" is replaced by the label names joined with ", " (en) or
# "、" (zh).
PROMPTS: dict[str, str] = {
    "en": "Write one short sentence describing a photo that contains: {labels}.\nSentence:",
    "zh": "写一句话描述一张包含以下物体的照片：{labels}。\n句子：",
}


@dataclasses.dataclass(frozen=True)
class Label:
  """A label's English name and, if it has one, its Chinese name."""
  en: str
  zh: str | None = None

  def name(self, lang: str) -> str | None:
    """The name in `lang` ("en" or "zh"); None for a label without a Chinese name."""
    return self.en if lang == "en" else self.zh


class Generator(Protocol):
  """Writes one sentence per label set, in `lang`."""

  def generate(self, label_sets: Sequence[Sequence[Label]], lang: str) -> list[str]:
    ...


def _check_lang(lang: str) -> None:
  if lang not in LANGS:
    raise ValueError(f"language {lang!r}: use one of {', '.join(LANGS)}")


# --- labels ---------------------------------------------------------------------------------------

def read_labels(path: str | os.PathLike) -> list[Label]:
  """The labels of a labels file, in file order. A duplicate English name (ignoring case and
  spacing) or Chinese name, a line with more than one tab, or an empty name is an error naming
  the line."""
  with open(path, "rb") as f:
    data = f.read()
  labels: list[Label] = []
  seen_en: dict[str, int] = {}
  seen_zh: dict[str, int] = {}
  for lineno, raw in enumerate(data.splitlines(), 1):
    try:
      line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip()
    except UnicodeDecodeError as e:
      raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the "
                       "line)") from None
    if not line.strip() or line.strip().startswith("#"):
      continue
    fields = [s.strip() for s in line.split("\t")]
    if len(fields) > 2:
      raise ValueError(f"{path}:{lineno}: {len(fields)} tab-separated fields: a line is "
                       "`english` or `english<TAB>chinese`")
    en = " ".join(fields[0].split())
    zh = fields[1] if len(fields) == 2 else None
    if not en:
      raise ValueError(f"{path}:{lineno}: empty English name")
    if zh is not None and not zh:
      raise ValueError(f"{path}:{lineno}: empty Chinese name after the tab")
    if en.lower() in seen_en:
      raise ValueError(f"{path}:{lineno}: duplicate label {en!r} (first on line "
                       f"{seen_en[en.lower()]})")
    if zh is not None and zh in seen_zh:
      raise ValueError(f"{path}:{lineno}: duplicate Chinese name {zh!r} (first on line "
                       f"{seen_zh[zh]})")
    seen_en[en.lower()] = lineno
    if zh is not None:
      seen_zh[zh] = lineno
    labels.append(Label(en, zh))
  if not labels:
    raise ValueError(f"{path}: no labels (one a line: `english` or `english<TAB>chinese`)")
  return labels


def sample_label_sets(labels: Sequence[Label], n: int, rng: random.Random, min_labels: int = 1,
                      max_labels: int = 4) -> list[list[int]]:
  """`n` sets of distinct indices into `labels`, each in random order; a set's size is uniform in
  [min_labels, max_labels], max_labels capped at len(labels)."""
  if n < 0:
    raise ValueError(f"n={n}: must be non-negative")
  if min_labels < 1 or max_labels < min_labels:
    raise ValueError(f"min_labels={min_labels}, max_labels={max_labels}: need "
                     "1 <= min_labels <= max_labels")
  if min_labels > len(labels):
    raise ValueError(f"min_labels={min_labels} but only {len(labels)} labels to choose from")
  hi = min(max_labels, len(labels))
  return [rng.sample(range(len(labels)), rng.randint(min_labels, hi)) for _ in range(n)]


# --- mentions -------------------------------------------------------------------------------------

_SIBILANT = ("s", "x", "z", "ch", "sh")


def plural_forms(word: str) -> list[str]:
  """`word` and its simple plurals: +s always; +es after s, x, z, ch, sh or o ("buses", "boxes",
  "tomatoes"); y -> ies after a consonant ("berries"). Irregular plurals ("mice", "knives") are
  not recognised."""
  w = word.lower()
  forms = [w, w + "s"]
  if w.endswith(_SIBILANT + ("o",)):
    forms.append(w + "es")
  if len(w) > 1 and w.endswith("y") and w[-2] not in "aeiou":
    forms.append(w[:-1] + "ies")
  return forms


@functools.lru_cache(maxsize=65536)
def _en_pattern(name: str) -> re.Pattern[str]:
  words = name.split()
  head = r"\s+".join(re.escape(w) for w in words[:-1])
  last = "|".join(re.escape(f) for f in plural_forms(words[-1]))
  body = (head + r"\s+" if head else "") + f"(?:{last})"
  return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


def mentions(text: str, label: Label, lang: str) -> bool:
  """Whether `text` mentions `label`. en: the English name, ignoring case, as whole words (any
  spacing between them), its last word possibly a simple plural (`plural_forms`): "red circles"
  mentions "red circle", "category" does not mention "cat". zh: the Chinese name as a substring;
  a label without one is never mentioned in Chinese."""
  _check_lang(lang)
  if lang == "zh":
    return label.zh is not None and label.zh in text
  return _en_pattern(label.en).search(text) is not None


def mentions_all(text: str, labels: Iterable[Label], lang: str) -> bool:
  """Whether `text` mentions every one of `labels`."""
  return all(mentions(text, label, lang) for label in labels)


# --- generators -----------------------------------------------------------------------------------

def article(name: str) -> str:
  """"an" before a vowel letter, else "a" (by spelling: "a unicorn" and "an hour" come out
  wrong)."""
  return "an" if name[:1].lower() in "aeiou" else "a"


def join_names(names: Sequence[str], lang: str, articles: bool = True) -> str:
  """en: "a red circle", "a red circle and a blue square", "a cat, a dog and an owl" (the
  articles optional); zh: "红色圆形", "红色圆形和蓝色正方形", "甲、乙和丙"."""
  _check_lang(lang)
  if not names:
    raise ValueError("no label names to join")
  if lang == "en":
    items = [f"{article(n)} {n}" if articles else n for n in names]
    sep, last = ", ", " and "
  else:
    items, sep, last = list(names), "、", "和"
  return items[0] if len(items) == 1 else sep.join(items[:-1]) + last + items[-1]


class TemplateGenerator:
  """The offline generator: a random template per label set, "{list}" filled with the joined label
  names (`join_names`). `templates` maps a language to its templates (default `TEMPLATES`)."""

  def __init__(self, templates: Mapping[str, Sequence[str]] | None = None, seed: int = 0,
               articles: bool = True):
    templates = TEMPLATES if templates is None else templates
    for lang, ts in templates.items():
      _check_lang(lang)
      if not ts:
        raise ValueError(f"no {lang} templates")
      for t in ts:
        if "{list}" not in t:
          raise ValueError(f"{lang} template {t!r} has no {{list}} to fill")
    self.templates = {lang: list(ts) for lang, ts in templates.items()}
    self.articles = articles
    self._rng = random.Random(seed)

  def generate(self, label_sets: Sequence[Sequence[Label]], lang: str) -> list[str]:
    """One sentence per label set."""
    if lang not in self.templates:
      raise ValueError(f"no {lang} templates (there are: {', '.join(self.templates)})")
    out = []
    for labels in label_sets:
      names = [_name(label, lang) for label in labels]
      template = self._rng.choice(self.templates[lang])
      out.append(template.replace("{list}", join_names(names, lang, self.articles)))
    return out


def _name(label: Label, lang: str) -> str:
  name = label.name(lang)
  if name is None:
    raise ValueError(f"label {label.en!r} has no {lang} name")
  return name


_QUOTES = "\"'“”‘’「」『』"
_SENTENCE_END = re.compile(rf"[.!?][{_QUOTES}]*(?=\s|$)|[。！？][{_QUOTES}]*")


def first_sentence(text: str) -> str:
  """The first line of `text` (after leading blanks), cut after its first sentence end (".", "!"
  or "?" before a space or the end, or "。！？"; closing quotes kept), stripped of blanks, and of
  the quotes around it if it starts with one."""
  lines = text.strip().splitlines()
  line = lines[0] if lines else ""
  m = _SENTENCE_END.search(line)
  if m:
    line = line[:m.end()]
  line = line.strip()
  return line.strip(_QUOTES).strip() if line[:1] in _QUOTES else line


class LMGenerator:
  """Sentences sampled from a local Hugging Face causal language model (a directory with its
  config, weights and tokenizer; nothing is downloaded), prompted per label set with `PROMPTS`.
  Sampling is seeded (torch.manual_seed, per batch, from `seed`), so a run is reproducible on the
  same machine and library versions."""

  def __init__(self, model_dir: str | os.PathLike, seed: int = 0, max_new_tokens: int = 40,
               temperature: float = 0.8, top_p: float = 0.95, device: str = "cpu",
               batch_size: int = 16, prompts: Mapping[str, str] | None = None):
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
      raise FileNotFoundError(f"{model_dir}: no such model directory (a Hugging Face causal LM "
                              "saved with save_pretrained)")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
      raise ValueError(f"{model_dir}: no config.json: not a Hugging Face model directory")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens}: must be at least 1")
    if temperature <= 0:
      raise ValueError(f"temperature={temperature}: must be positive")
    if not 0 < top_p <= 1:
      raise ValueError(f"top_p={top_p}: must be in (0, 1]")
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size}: must be at least 1")
    self.prompts = dict(PROMPTS if prompts is None else prompts)
    for lang, p in self.prompts.items():
      _check_lang(lang)
      if "{labels}" not in p:
        raise ValueError(f"{lang} prompt {p!r} has no {{labels}} to fill")
    import torch
    import transformers
    self._torch = torch
    try:
      self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
      self.model = transformers.AutoModelForCausalLM.from_pretrained(model_dir,
                                                                     local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise ValueError(f"{model_dir}: cannot load a causal LM and its tokenizer: {first}") from e
    tok = self.tokenizer
    if tok.pad_token is None:
      if tok.eos_token is None:
        raise ValueError(f"{model_dir}: the tokenizer has neither a pad nor an eos token")
      tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    self.model.to(device).eval()
    self.device = device
    self.seed, self.max_new_tokens = seed, max_new_tokens
    self.temperature, self.top_p, self.batch_size = temperature, top_p, batch_size
    self._rng = random.Random(seed)

  def prompt(self, labels: Sequence[Label], lang: str) -> str:
    """The prompt for one label set."""
    if lang not in self.prompts:
      raise ValueError(f"no {lang} prompt (there are: {', '.join(self.prompts)})")
    names = [_name(label, lang) for label in labels]
    return self.prompts[lang].replace("{labels}", (", " if lang == "en" else "、").join(names))

  def generate(self, label_sets: Sequence[Sequence[Label]], lang: str) -> list[str]:
    """One sentence per label set: the first sentence of a sampled completion."""
    prompts = [self.prompt(labels, lang) for labels in label_sets]
    return [first_sentence(t) for t in self.complete(prompts)]

  def complete(self, prompts: Sequence[str]) -> list[str]:
    """The sampled continuation (new tokens only, decoded) of each prompt, in batches."""
    torch, tok = self._torch, self.tokenizer
    out: list[str] = []
    for start in range(0, len(prompts), self.batch_size):
      batch = list(prompts[start:start + self.batch_size])
      enc = tok(batch, return_tensors="pt", padding=True)
      inputs = {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask")}
      torch.manual_seed(self._rng.getrandbits(63))
      with torch.no_grad():
        tokens = self.model.generate(
            **inputs, do_sample=True, temperature=self.temperature, top_p=self.top_p,
            max_new_tokens=self.max_new_tokens, pad_token_id=tok.pad_token_id)
      new = tokens[:, inputs["input_ids"].shape[1]:]
      out.extend(tok.batch_decode(new, skip_special_tokens=True))
    return out


# --- the whole run --------------------------------------------------------------------------------

def _split(n: int, k: int) -> list[int]:
  return [n // k + (i < n % k) for i in range(k)]


def generate_sentences(labels: Sequence[Label], n: int, generator: Generator,
                       langs: Sequence[str] = LANGS, seed: int = 0, min_labels: int = 1,
                       max_labels: int = 4, max_tries: int = 5, chunk_size: int = 256,
                       progress: Callable[[dict], None] | None = None
                       ) -> tuple[list[dict], dict]:
  """About `n` sentences in all, split evenly over `langs`, each mentioning every label of a label
  set sampled for it (Chinese sets only from labels with a Chinese name). A set whose sentence
  misses a label is asked again, up to `max_tries` times in all, then given up ("unfilled").

  Returns the rows, by language then set, {"text", "labels": [English names], "label_ids":
  [indices into `labels`], "lang"}, and a report {"requested", "prompted", "kept",
  "dropped_missing_label", "unfilled", "distinct_texts", "by_lang": {lang: the same counts}}.
  `progress`, if given, gets the report so far after every call of the generator (at most
  `chunk_size` sets a call).
  """
  if not langs:
    raise ValueError("no languages")
  for lang in langs:
    _check_lang(lang)
  if len(set(langs)) != len(langs):
    raise ValueError(f"languages {list(langs)}: each at most once")
  if max_tries < 1 or chunk_size < 1:
    raise ValueError(f"max_tries={max_tries}, chunk_size={chunk_size}: must be at least 1")
  rng = random.Random(seed)
  counts = ("requested", "prompted", "kept", "dropped_missing_label", "unfilled")
  by_lang = {lang: dict.fromkeys(counts, 0) for lang in langs}
  report = dict.fromkeys(counts, 0) | {"distinct_texts": 0, "by_lang": by_lang}

  def add(lang: str, key: str, k: int) -> None:
    by_lang[lang][key] += k
    report[key] += k

  plans = []
  for lang, n_lang in zip(langs, _split(n, len(langs))):
    pool = [i for i, label in enumerate(labels) if label.name(lang) is not None]
    if n_lang and not pool:
      raise ValueError(f"no label has a {lang} name (labels file lines `english<TAB>chinese`)")
    try:
      sets = sample_label_sets([labels[i] for i in pool], n_lang, rng, min_labels, max_labels)
    except ValueError as e:
      raise ValueError(f"{lang}: {e}") from None
    plans.append((lang, [[pool[j] for j in s] for s in sets]))
    add(lang, "requested", n_lang)

  rows: list[dict] = []
  for lang, sets in plans:
    texts: list[str | None] = [None] * len(sets)
    pending = list(range(len(sets)))
    for _ in range(max_tries):
      failed = []
      for start in range(0, len(pending), chunk_size):
        chunk = pending[start:start + chunk_size]
        label_sets = [[labels[i] for i in sets[k]] for k in chunk]
        out = generator.generate(label_sets, lang)
        if len(out) != len(chunk):
          raise ValueError(f"the generator returned {len(out)} sentences for {len(chunk)} label "
                           "sets")
        for k, ls, text in zip(chunk, label_sets, out):
          if mentions_all(text, ls, lang):
            texts[k] = text
          else:
            failed.append(k)
        add(lang, "prompted", len(chunk))
        add(lang, "kept", len(chunk) - sum(1 for k in chunk if texts[k] is None))
        add(lang, "dropped_missing_label", sum(1 for k in chunk if texts[k] is None))
        if progress is not None:
          progress(report)
      pending = failed
      if not pending:
        break
    add(lang, "unfilled", len(pending))
    rows.extend({"text": text, "labels": [labels[i].en for i in ids], "label_ids": list(ids),
                 "lang": lang} for ids, text in zip(sets, texts) if text is not None)
  report["distinct_texts"] = len({r["text"] for r in rows})
  return rows, report
