"""Captioning metrics and references: BLEU-1..4 and CIDEr-D equal pycocoevalcap's (fed the same
tokenised strings, so no Java), the PTB-style and per-character tokenisers, COCO captions files."""

import contextlib
import io
import json
import os
import random
import shutil

import numpy as np
import pytest

from bigvl.evaluators import caption_metrics as cm
from bigvl.evaluators import sources

# Captions as COCO's are written, and what CoreNLP 3.4.1 (pycocoevalcap's PTBTokenizer) makes of
# them, punctuation tokens dropped.
PTB_CASES = [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ("Don't let the dog's bone go; it's mine!", "do n't let the dog 's bone go it 's mine"),
    ("The cat can't, won't and cannot sit. They're here, we'll go, I'd say, I'm ok, you've seen.",
     "the cat ca n't wo n't and can not sit they 're here we 'll go i 'd say i 'm ok you 've seen"),
    ("A \"quoted\" word and 'single quoted' and `back` ones.",
     "a quoted word and single quoted and back ones"),
    ("Parens (like this) and [brackets] and {braces} here.",
     "parens -lrb- like this -rrb- and -lsb- brackets -rsb- and -lcb- braces -rcb- here"),
    ("Black-and-white photo -- a dash - and a hyphen.",
     "black-and-white photo a dash and a hyphen"),
    ("Wait... what? 3.5 kg, 1,000 people at 10:30 a.m. in the U.S. with Mr. Smith etc.",
     "wait what 3.5 kg 1,000 people at 10:30 a.m. in the u.s. with mr. smith etc."),
    ("$5 and 50% and #1 and a&b and and/or and 2*3 and 1/2.",
     "$ 5 and 50 % and # 1 and a & b and and/or and 2 * 3 and 1/2"),
    ("Dogs' toys. O'Neil's house at 5 o'clock.", "dogs toys o'neil 's house at 5 o'clock"),
    ("\u201cCurly quotes\u201d and \u2018curly single\u2019 and don\u2019t and dog\u2019s.",
     "curly quotes and curly single and do n't and dog 's"),
    ("Ellipsis\u2026 and an em\u2014dash and en\u2013dash.", "ellipsis and an em dash and en dash"),
    ("gonna wanna gotta lemme gimme", "gon na wan na got ta lem me gim me"),
    ("Lots of people at the airport!!! Really?!", "lots of people at the airport !!! really ?!"),
    ("An emoji \U0001F600 here, a 10-year-old boy, a 3.5-inch screen and 1.5x zoom.",
     "an emoji here a 10-year-old boy a 3.5-inch screen and 1.5 x zoom"),
    ("A pizza with pepperoni,olives and cheese.", "a pizza with pepperoni olives and cheese"),
    ("A man who is wearing a tie.He is smiling.", "a man who is wearing a tie.he is smiling"),
    ("a sign for Main St. and 5th Ave. at 5 P.M.", "a sign for main st. and 5th ave. at 5 p.m."),
    ("A box of donuts (a dozen) on the counter, no. 5 and No. one.",
     "a box of donuts -lrb- a dozen -rrb- on the counter no. 5 and no one"),
    ("A sandwich cut in 1 1/2 pieces and \u00bd.", "a sandwich cut in 1\u00a01/2 pieces and 1/2"),
    ("Rock 'n' roll in the '60s, y'all.", "rock 'n' roll in the '60s y' all"),
    ("It's 'the' end', 'right'", "it 's the end right"),
]


def test_english_is_tokenised_as_coco_ptb_tokenizer_does():
  for text, want in PTB_CASES:
    assert " ".join(cm.tokenize(text, "en")) == want, text


@pytest.mark.skipif(shutil.which("java") is None, reason="needs Java for CoreNLP")
def test_english_tokens_equal_corenlp_itself():
  """Where Java is there: pycocoevalcap's own PTBTokenizer on the cases above."""
  ptb = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
  with contextlib.redirect_stderr(io.StringIO()):
    got = ptb.PTBTokenizer().tokenize({i: [{"caption": t}] for i, (t, _) in enumerate(PTB_CASES)})
  for i, (text, _) in enumerate(PTB_CASES):
    assert " ".join(cm.tokenize(text, "en")) == got[i][0], text


def test_chinese_is_one_token_per_character():
  assert cm.tokenize("一只狗在草地上奔跑。", "zh") == list("一只狗在草地上奔跑")
  assert cm.tokenize("两个人在玩 Xbox 360 游戏，很开心！", "zh") == [
      "两", "个", "人", "在", "玩", "xbox", "360", "游", "戏", "很", "开", "心"]
  # Full-width letters and digits are ASCII ones; a decimal number is one token.
  assert cm.tokenize("ＴＶ上有３.５个“苹果”…", "zh") == ["tv", "上", "有", "3.5", "个", "苹", "果"]
  assert cm.tokenize("一件T恤, 2个杯子 (红色)", "zh") == ["一", "件", "t", "恤", "2", "个", "杯", "子",
                                                     "红", "色"]
  assert cm.tokenize(" ，。！ ", "zh") == []


# ---------------------------------------------------------------------------- BLEU and CIDEr-D
def _reference_scores(res, gts):
  pytest.importorskip("pycocoevalcap")
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  with contextlib.redirect_stdout(io.StringIO()):   # Bleu prints its counts
    bleu, bleu_per = Bleu(4).compute_score(gts, res)
  cider, cider_per = Cider().compute_score(gts, res)
  return bleu, bleu_per, cider, cider_per


def _assert_same_as_pycocoevalcap(res, gts):
  bleu, bleu_per, cider, cider_per = _reference_scores(res, gts)
  mine, mine_per = cm.bleu(res, gts)
  np.testing.assert_allclose(mine, bleu, rtol=0, atol=1e-9)
  np.testing.assert_allclose(mine_per, bleu_per, rtol=0, atol=1e-9)
  c, c_per = cm.cider_d(res, gts)
  np.testing.assert_allclose(c, cider, rtol=0, atol=1e-9)
  np.testing.assert_allclose(c_per, cider_per, rtol=0, atol=1e-9)
  return mine, c


RAW_EN = {   # image: (candidate, references)
    "same": ("A dog runs on the grass.", ["A dog runs on the grass.", "A brown dog running outside",
                                         "The dog is running on a lawn."]),
    "partial": ("A cat sitting on a red couch.", ["A cat lying on a couch.",
                                                 "An orange cat on the sofa", "cat on a red sofa"]),
    "none": ("Two airplanes at the airport", ["A bowl of soup with a spoon.", "Soup in a bowl."]),
    "longer": ("A man in a blue shirt and black hat is riding a bike down a busy city street "
               "next to a bus.", ["A man rides a bike.", "A cyclist on a street."]),
    "shorter": ("A kitchen.", ["A kitchen with a stove, an oven and a refrigerator.",
                               "A small kitchen with white cabinets and a window"]),
    "repeats": ("a a a dog dog dog dog", ["a dog and a dog", "two dogs", "a dog"]),
    "one_ref": ("Don't touch the man's hat!", ["Someone won't touch the man's hat."]),
}
RAW_ZH = {
    "same": ("一只狗在草地上奔跑。", ["一只狗在草地上奔跑。", "草地上有一只棕色的狗"]),
    "partial": ("一只猫坐在红色的沙发上", ["一只猫躺在沙发上。", "沙发上的橙色猫"]),
    "none": ("机场里的两架飞机", ["一碗汤和一把勺子", "碗里的汤"]),
    "longer": ("一个穿着蓝色衬衫戴着黑色帽子的男人在繁忙的城市街道上骑自行车", ["一个男人骑自行车"]),
    "shorter": ("厨房", ["一个有炉子、烤箱和冰箱的厨房", "一个白色橱柜的小厨房"]),
    "repeats": ("狗狗狗狗狗", ["一只狗", "两只狗在玩"]),
    "ascii": ("两个人在玩Xbox 360游戏", ["两个人在玩 XBOX 游戏", "玩360的人"]),
}


@pytest.mark.parametrize("raw,lang", [(RAW_EN, "en"), (RAW_ZH, "zh")], ids=["en", "zh"])
def test_bleu_and_cider_equal_pycocoevalcap_on_hand_made_cases(raw, lang):
  res = {k: [" ".join(cm.tokenize(c, lang))] for k, (c, _) in raw.items()}
  gts = {k: [" ".join(cm.tokenize(r, lang)) for r in refs] for k, (_, refs) in raw.items()}
  bleu, cider = _assert_same_as_pycocoevalcap(res, gts)
  assert 0 < bleu[3] < 1 and 0 < cider < 10
  scores = cm.score_captions({k: c for k, (c, _) in raw.items()},
                             {k: refs for k, (_, refs) in raw.items()}, lang)
  assert scores == pytest.approx({"bleu1": bleu[0], "bleu2": bleu[1], "bleu3": bleu[2],
                                  "bleu4": bleu[3], "cider": cider}, abs=1e-12)
  # Each kind of case alone, with another image for the document frequencies of CIDEr-D.
  for k in raw:
    pair = [k, "none" if k != "none" else "same"]
    _assert_same_as_pycocoevalcap({i: res[i] for i in pair}, {i: gts[i] for i in pair})


def test_bleu_and_cider_equal_pycocoevalcap_on_random_sets():
  rng = random.Random(0)
  words = "a the dog cat man on in with red big sits runs".split()

  def text(lo=0):
    return " ".join(rng.choices(words, k=rng.randint(lo, 14)))
  for _ in range(60):
    keys = rng.sample(range(100), rng.randint(1, 8))
    res = {k: [text()] for k in keys}
    gts = {k: [text() for _ in range(rng.randint(1, 5))] for k in keys}
    _assert_same_as_pycocoevalcap(res, gts)


def test_perfect_captions_and_edge_cases():
  gts = {1: ["a dog on the grass", "a brown dog"], 2: ["two cats on a red couch"]}
  bleu, _ = cm.bleu({1: ["a dog on the grass"], 2: ["two cats on a red couch"]}, gts)
  assert bleu == pytest.approx([1.0] * 4)
  with pytest.raises(ValueError, match="different images"):
    cm.bleu({1: ["a"]}, gts)
  with pytest.raises(ValueError, match="one candidate"):
    cm.cider_d({1: ["a", "b"], 2: ["c"]}, gts)
  with pytest.raises(ValueError, match="no prediction"):
    cm.score_captions({1: "a dog"}, {1: ["a dog"], 2: ["a cat"]}, "en")
  # An empty candidate scores (about) zero rather than failing, as in pycocoevalcap.
  bleu, cider = _assert_same_as_pycocoevalcap({1: [""], 2: ["two cats"]}, gts)
  assert bleu[3] < 1e-3 and cider >= 0


# ---------------------------------------------------------------------------- COCO captions files
def _png(path, color):
  from PIL import Image
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", (12, 10), color).save(path)


def _coco(tmp_path, images, annotations, name="captions_val2017.json", folder="annotations"):
  path = tmp_path / folder / name
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations},
                             ensure_ascii=False), encoding="utf-8")
  return str(path)


IMAGES = [{"id": 42, "file_name": "b.png", "height": 10, "width": 12},
          {"id": 7, "file_name": "a.png", "height": 10, "width": 12}]
ANNOTATIONS = [{"image_id": 7, "id": 1, "caption": "A red square."},
               {"image_id": 42, "id": 2, "caption": "A green square "},
               {"image_id": 7, "id": 3, "caption": "红色的正方形"},
               {"image_id": 42, "id": 4, "caption": "   "},
               {"image_id": 42, "id": 5, "caption": "Something green."}]


def test_coco_captions_reads_images_in_order_with_their_references(tmp_path):
  _png(str(tmp_path / "annotations" / "a.png"), (255, 0, 0))
  _png(str(tmp_path / "annotations" / "b.png"), (0, 255, 0))
  path = _coco(tmp_path, IMAGES, ANNOTATIONS)
  data = sources.coco_captions(path, 8)
  assert len(data) == 2
  assert data.captions == [[("en", "A green square "), ("en", "Something green.")],
                           [("en", "A red square."), ("zh", "红色的正方形")]]
  pixels = data.images.load(np.array([1, 0]))["image"]
  assert pixels.shape == (2, 8, 8, 3)
  assert pixels[0, ..., 0].min() > 200 and pixels[1, ..., 1].min() > 200   # a is red, b green
  assert len(sources.coco_captions(path, 8, max_examples=1)) == 1
  # Through an eval entry's source.
  opened = sources.open_entry("c", {"source": f"coco:{path}"}, image_size=8)
  assert opened.captions == data.captions


def test_coco_captions_finds_images_under_data_dir_or_the_split_folder(tmp_path):
  path = _coco(tmp_path, IMAGES, ANNOTATIONS)
  for name, color in (("a.png", (255, 0, 0)), ("b.png", (0, 255, 0))):
    _png(str(tmp_path / "val2017" / name), color)     # COCO's layout: annotations/, val2017/
  assert len(sources.coco_captions(path, 8)) == 2
  assert len(sources.coco_captions(path, 8, image_root=str(tmp_path / "val2017"))) == 2
  assert len(sources.coco_captions(path, 8, image_root=str(tmp_path))) == 2
  with pytest.raises(FileNotFoundError, match=r"captions_val2017.json: 2 image\(s\) not found, "
                                              r"e.g. image 42 at .*elsewhere/b.png"):
    sources.coco_captions(path, 8, image_root=str(tmp_path / "elsewhere"))


def test_coco_cn_style_chinese_captions(tmp_path):
  _png(str(tmp_path / "imgs" / "COCO_val2014_000000000001.jpg"), (0, 0, 255))
  path = _coco(tmp_path, [{"id": "COCO_val2014_000000000001",
                           "file_name": "COCO_val2014_000000000001.jpg"}],
               [{"image_id": "COCO_val2014_000000000001", "caption": "一只蓝色的鸟。"},
                {"image_id": "COCO_val2014_000000000001", "caption": "天空是蓝色的"}],
               name="coco-cn_test.json", folder="cn")
  data = sources.coco_captions(path, 8, image_root=str(tmp_path / "imgs"))
  assert data.captions == [[("zh", "一只蓝色的鸟。"), ("zh", "天空是蓝色的")]]


def _one_line(error, fn, match):
  with pytest.raises(error, match=match) as e:
    fn()
  assert "\n" not in str(e.value), str(e.value)


def test_coco_captions_errors_name_the_file_and_the_entry(tmp_path):
  _png(str(tmp_path / "annotations" / "a.png"), (255, 0, 0))
  _png(str(tmp_path / "annotations" / "b.png"), (0, 255, 0))

  def read(images, annotations):
    return lambda: sources.coco_captions(_coco(tmp_path, images, annotations), 8)
  f = r"captions_val2017.json: "
  _one_line(ValueError, read(IMAGES, None), f + r"needs \"images\" and \"annotations\" lists")
  _one_line(ValueError, read([{"id": 1}], ANNOTATIONS), f + r"images\[0\] needs an \"id\" and a")
  _one_line(ValueError, read(IMAGES + [IMAGES[0]], ANNOTATIONS),
            f + r"images\[2\]: id 42 is also images\[0\]")
  _one_line(ValueError, read(IMAGES, ANNOTATIONS + [{"image_id": 7}]),
            f + r"annotations\[5\] needs an \"image_id\" and a \"caption\" string")
  _one_line(ValueError, read(IMAGES, ANNOTATIONS + [{"image_id": 3, "caption": "x"}]),
            f + r"annotations\[5\]: image_id 3 is not in \"images\"")
  _one_line(ValueError, read(IMAGES, [a for a in ANNOTATIONS if a["image_id"] == 7]),
            f + r"image 42 \(b.png\) has no caption \(1 such\)")
  _one_line(FileNotFoundError, read(IMAGES + [{"id": 9, "file_name": "gone.png"}],
                                    ANNOTATIONS + [{"image_id": 9, "caption": "x"}]),
            f + r"1 image\(s\) not found, e.g. image 9 at .*gone.png")
  (tmp_path / "annotations" / "bad.png").write_bytes(b"not an image")
  _one_line(sources.BadEvalImageError, read(IMAGES + [{"id": 9, "file_name": "bad.png"}],
                                            ANNOTATIONS + [{"image_id": 9, "caption": "x"}]),
            f + r"image 9: image .*bad.png is not readable")
  broken = tmp_path / "annotations" / "captions_broken.json"
  broken.write_text("{\"images\": [", encoding="utf-8")
  _one_line(ValueError, lambda: sources.coco_captions(str(broken), 8),
            r"captions_broken.json: not JSON")
