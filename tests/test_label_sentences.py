"""Label sentences for the text-as-image multi-label adapter: labels files, the mention rules, the
template and language-model generators, the filter and launch/generate_label_sentences.py."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from bigvl.data import label_sentences as ls

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "generate_label_sentences.py"
LABELS = "# shapes and things\nred circle\t红色圆形\nblue square\t蓝色正方形\n\nbox\t盒子\napple\ncat\t猫\n"


@pytest.fixture
def labels_file(tmp_path: Path) -> Path:
  path = tmp_path / "labels.txt"
  path.write_text(LABELS, encoding="utf-8")
  return path


def test_read_labels(labels_file, tmp_path):
  labels = ls.read_labels(labels_file)
  assert labels == [ls.Label("red circle", "红色圆形"), ls.Label("blue square", "蓝色正方形"),
                    ls.Label("box", "盒子"), ls.Label("apple", None), ls.Label("cat", "猫")]
  bad = tmp_path / "bad.txt"
  for data, error in [
      ("cat\n# c\n\nCat\n".encode(), r"bad.txt:4: duplicate label 'Cat' \(first on line 1\)"),
      ("cat\t猫\ndog\t猫\n".encode(), r"bad.txt:2: duplicate Chinese name '猫'"),
      ("cat\t猫\tx\n".encode(), r"bad.txt:1: 3 tab-separated fields"),
      (b"cat\n\t x\n", r"bad.txt:2: empty English name"),
      (b"# nothing\n\n", r"bad.txt: no labels"),
      (b"cat\n\xff\n", r"bad.txt:2: not UTF-8")]:
    bad.write_bytes(data)
    with pytest.raises(ValueError, match=error):
      ls.read_labels(bad)


def test_sample_label_sets():
  labels = [ls.Label(f"l{i}") for i in range(6)]
  sets = ls.sample_label_sets(labels, 300, random.Random(0), min_labels=2, max_labels=4)
  assert len(sets) == 300 and {len(s) for s in sets} == {2, 3, 4}
  assert all(len(set(s)) == len(s) and all(0 <= i < 6 for i in s) for s in sets)
  capped = ls.sample_label_sets(labels[:2], 50, random.Random(0), min_labels=1, max_labels=4)
  assert {len(s) for s in capped} == {1, 2}
  with pytest.raises(ValueError, match="min_labels=3 but only 2 labels"):
    ls.sample_label_sets(labels[:2], 1, random.Random(0), min_labels=3)


def test_mentions_english_words_and_plurals():
  m = lambda text, en: ls.mentions(text, ls.Label(en), "en")  # noqa: E731
  assert m("Two Circles!", "circle") and m("a circle.", "circle")
  assert m("boxes everywhere", "box") and m("three buses", "bus") and m("wild berries", "berry")
  assert m("red  circles and more", "red circle") and m("the cat's toy", "cat")
  assert not m("a category", "cat") and not m("concatenate", "cat") and not m("bobcat", "cat")
  assert not m("a red big circle", "red circle") and not m("circled", "circle")
  assert not m("boxs", "bo") and not m("days", "dais")
  assert m("toys", "toy") and not m("toies", "toy")


def test_mentions_chinese():
  assert ls.mentions("图中有红色圆形。", ls.Label("red circle", "红色圆形"), "zh")
  assert not ls.mentions("图中有红色方形。", ls.Label("red circle", "红色圆形"), "zh")
  assert not ls.mentions("图中有apple。", ls.Label("apple"), "zh")
  with pytest.raises(ValueError, match="language 'fr'"):
    ls.mentions("x", ls.Label("x"), "fr")


def test_join_names_and_templates():
  assert ls.join_names(["red circle"], "en") == "a red circle"
  assert ls.join_names(["red circle", "blue square"], "en") == "a red circle and a blue square"
  assert ls.join_names(["cat", "dog", "owl"], "en") == "a cat, a dog and an owl"
  assert ls.join_names(["cat", "owl"], "en", articles=False) == "cat and owl"
  assert ls.join_names(["猫"], "zh") == "猫"
  assert ls.join_names(["猫", "狗", "鸟"], "zh") == "猫、狗和鸟"
  assert all(len(ls.TEMPLATES[lang]) >= 6 for lang in ls.LANGS)
  g = ls.TemplateGenerator({"en": ["{list} here."]}, articles=False)
  assert g.generate([[ls.Label("cat"), ls.Label("owl")]], "en") == ["cat and owl here."]
  with pytest.raises(ValueError, match="no zh templates"):
    g.generate([[ls.Label("cat", "猫")]], "zh")
  with pytest.raises(ValueError, match="has no {list}"):
    ls.TemplateGenerator({"en": ["a photo."]})


def test_template_sentences_mention_every_label(labels_file):
  labels = ls.read_labels(labels_file)
  rows, report = ls.generate_sentences(labels, 301, ls.TemplateGenerator(seed=1), seed=3,
                                       max_labels=4, chunk_size=64)
  assert report["requested"] == report["prompted"] == report["kept"] == len(rows) == 301
  assert report["dropped_missing_label"] == report["unfilled"] == 0
  assert report["by_lang"]["en"]["kept"] == 151 and report["by_lang"]["zh"]["kept"] == 150
  for row in rows:
    sel = [labels[i] for i in row["label_ids"]]
    assert row["labels"] == [label.en for label in sel] and 1 <= len(sel) <= 4
    assert ls.mentions_all(row["text"], sel, row["lang"])
    assert row["lang"] == "en" or all(label.zh for label in sel)  # apple has no zh name
  assert {len(r["label_ids"]) for r in rows} == {1, 2, 3, 4}
  again, _ = ls.generate_sentences(labels, 301, ls.TemplateGenerator(seed=1), seed=3)
  assert again == rows


class _HalfGenerator:
  """Writes a sentence missing the last label for every other set on its first try, then
  sentences that mention every label."""

  def __init__(self):
    self.calls: dict[tuple[str, ...], int] = {}

  def generate(self, label_sets, lang):
    out = []
    for labels in label_sets:
      key = tuple(label.en for label in labels)
      tries = self.calls[key] = self.calls.get(key, 0) + 1
      names = [label.name(lang) for label in labels]
      if tries == 1 and len(names) > 1 and key[0][-1] in "1357":
        names = names[:-1]
      out.append(" and ".join(names) + ".")
    return out


def test_filter_keeps_only_sentences_mentioning_all_labels():
  labels = [ls.Label(f"thing{i}", f"物{i}") for i in range(8)]
  rows, report = ls.generate_sentences(labels, 60, _HalfGenerator(), langs=("en",), seed=0,
                                       min_labels=2, max_labels=3, max_tries=1)
  assert 0 < report["kept"] < 60 and report["kept"] == len(rows)
  assert report["dropped_missing_label"] == report["unfilled"] == 60 - len(rows)
  assert all(ls.mentions_all(r["text"], [labels[i] for i in r["label_ids"]], "en") for r in rows)
  retried, report = ls.generate_sentences(labels, 60, _HalfGenerator(), langs=("en",), seed=0,
                                          min_labels=2, max_labels=3, max_tries=2)
  assert len(retried) == report["kept"] == 60 and report["unfilled"] == 0
  assert report["prompted"] == 60 + report["dropped_missing_label"] > 60


def test_first_sentence():
  assert ls.first_sentence("  A red circle. And more.\nnext") == "A red circle."
  assert ls.first_sentence("\n\n\"a 3.5 cm box!\" said") == "a 3.5 cm box!"
  assert ls.first_sentence("图中有猫。还有狗。") == "图中有猫。"
  assert ls.first_sentence("no end here\nsecond") == "no end here"
  assert ls.first_sentence("") == ""


WORDS = ["circle", "square", "star", "圆形", "方形", "星星"]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
  """A randomly initialised 2-layer GPT-2 (width 16) over the label words, with a word-level
  tokenizer that has an eos token and no pad token, saved as a Hugging Face model directory."""
  transformers = pytest.importorskip("transformers")
  tokenizers = pytest.importorskip("tokenizers")
  out = tmp_path_factory.mktemp("tiny_lm")
  vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
  tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>",
                                       eos_token="<eos>").save_pretrained(out)
  config = transformers.GPT2Config(vocab_size=len(vocab), n_embd=16, n_layer=2, n_head=2,
                                   n_positions=64, bos_token_id=1, eos_token_id=1)
  transformers.GPT2LMHeadModel(config).save_pretrained(out)
  return out


SHAPES = [ls.Label("circle", "圆形"), ls.Label("square", "方形"), ls.Label("star", "星星")]


def test_lm_generator(tiny_lm, monkeypatch):
  g = ls.LMGenerator(tiny_lm, seed=0, max_new_tokens=8, batch_size=2)
  assert g.tokenizer.pad_token == "<eos>" and g.tokenizer.padding_side == "left"
  assert g.prompt(SHAPES[:2], "en") == ("Write one short sentence describing a photo that "
                                        "contains: circle, square.\nSentence:")
  assert g.prompt(SHAPES[:2], "zh") == "写一句话描述一张包含以下物体的照片：圆形、方形。\n句子："
  sets = [SHAPES[:1], SHAPES, SHAPES[1:]]  # batches of 2 and 1, prompts of unequal lengths
  texts = g.generate(sets, "en")
  assert len(texts) == 3 and all(isinstance(t, str) and "\n" not in t for t in texts)
  same = ls.LMGenerator(tiny_lm, seed=0, max_new_tokens=8, batch_size=2)
  assert same.generate(sets, "en") == texts  # seeded
  # Every set is {circle, square}: the first sentence of each completion is checked.
  raw = iter([" circle and squares. star\n", "\nstar and a square.", " 圆形和方形。", "方形\n圆形"])
  monkeypatch.setattr(g, "complete", lambda prompts: [next(raw) for _ in prompts])
  rows, report = ls.generate_sentences(SHAPES[:2], 4, g, seed=0, min_labels=2, max_tries=1)
  assert [r["text"] for r in rows] == ["circle and squares.", "圆形和方形。"]
  assert report["prompted"] == 4 and report["kept"] == 2
  assert report["dropped_missing_label"] == report["unfilled"] == 2
  assert [sorted(r["labels"]) for r in rows] == [["circle", "square"]] * 2


def test_lm_generator_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such model directory"):
    ls.LMGenerator(tmp_path / "missing")
  with pytest.raises(ValueError, match="no config.json"):
    ls.LMGenerator(tmp_path)


def _cli(*args: str, check_imports: bool = False) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  if not check_imports:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          cwd="/", env=env, timeout=120)
  code = ("import runpy, sys\n"
          f"sys.argv = [{str(SCRIPT)!r}, *{list(args)!r}]\n"
          "try:\n"
          f"  runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
          "finally:\n"
          "  heavy = [m for m in ('jax', 'torch', 'transformers') if m in sys.modules]\n"
          "  print('HEAVY', heavy, file=sys.stderr)\n")
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                        env=env, timeout=120)


def _rows(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_cli_templates(labels_file, tmp_path):
  out = tmp_path / "sub" / "sentences.jsonl"
  r = _cli(f"--labels={labels_file}", f"--out={out}", "--num=40", "--max_labels=3",
           check_imports=True)
  assert r.returncode == 0, r.stderr
  assert "HEAVY []" in r.stderr
  report = json.loads(r.stdout.strip().splitlines()[-1])
  assert report["generator"] == "templates"
  assert report["requested"] == report["kept"] == 40 and report["unfilled"] == 0
  rows = _rows(out)
  labels = ls.read_labels(labels_file)
  assert len(rows) == 40 and {r["lang"] for r in rows} == {"en", "zh"}
  assert all(ls.mentions_all(r["text"], [labels[i] for i in r["label_ids"]], r["lang"])
             for r in rows)
  assert "红色圆形" in out.read_text(encoding="utf-8")  # not \u-escaped
  assert os.listdir(out.parent) == ["sentences.jsonl"]


def test_cli_errors(labels_file, tmp_path):
  dup = tmp_path / "dup.txt"
  dup.write_text("cat\nCat\n", encoding="utf-8")
  out = tmp_path / "o.jsonl"
  for args, error in [
      ([f"--labels={dup}"], "ValueError: " + f"{dup}:2: duplicate label 'Cat'"),
      ([f"--labels={labels_file}", f"--model={tmp_path / 'nope'}"],
       "FileNotFoundError: " + f"{tmp_path / 'nope'}: no such model directory"),
      ([f"--labels={labels_file}", "--langs=en,fr"], "--langs=en,fr")]:
    r = _cli(*args, f"--out={out}")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert error in r.stderr
  assert not out.exists()


def test_cli_model(tiny_lm, tmp_path):
  labels = tmp_path / "shapes.txt"
  labels.write_text("".join(f"{s.en}\t{s.zh}\n" for s in SHAPES), encoding="utf-8")
  out = tmp_path / "lm.jsonl"
  r = _cli(f"--labels={labels}", f"--out={out}", f"--model={tiny_lm}", "--num=8",
           "--max_labels=2", "--max_new_tokens=10", "--max_tries=3", "--batch_size=4")
  assert r.returncode in (0, 1), r.stderr
  report = json.loads(r.stdout.strip().splitlines()[-1])
  assert report["generator"] == str(tiny_lm) and report["requested"] == 8
  assert report["prompted"] == report["kept"] + report["dropped_missing_label"] >= 8
  assert report["kept"] + report["unfilled"] == 8
  if report["kept"]:
    rows = _rows(out)
    assert len(rows) == report["kept"]
    assert all(ls.mentions_all(r["text"], [SHAPES[i] for i in r["label_ids"]], r["lang"])
               for r in rows)
  else:
    assert r.returncode == 1 and not out.exists()
