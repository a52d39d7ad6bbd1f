"""Tests for the GLM tokenizer and the small SentencePiece trainer."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from bigvl.tokenizers import glm
from bigvl.tokenizers import sp_train

GLM_MODEL = Path(__file__).parents[2] / "shared/tokenizers/glm_chinese_sp.model"
CLS, EOS = 50002, 50000

CORPUS = [
    "A dog runs on the green grass.",
    "Two cats  sleep on a red sofa.",
    "一只狗在绿色的草地上奔跑。",
    "两只猫在红色的沙发上睡觉。",
    "A man rides a bicycle 在街道上 near 2 cars.",
] * 20


# --- an independent re-derivation of the reference encoding ----------------

def _blank_runs(text: str) -> str:
  """Spec: runs of 2..10 spaces -> <|blank_n|>; longer runs take tens first."""
  def repl(m: re.Match) -> str:
    k = len(m.group(0))
    rest = k % 10
    tail = f"<|blank_{rest}|>" if rest >= 2 else " " * rest
    return "<|blank_10|>" * (k // 10) + tail
  return re.sub(r" {2,}", repl, text)


def _expected(sp: spm.SentencePieceProcessor, text: str, max_len: int = 52):
  """[CLS] + sp(text) + EOS, keeping the LAST pieces, padded with EOS."""
  body = sp.encode(_blank_runs(text.lower()))
  body = body[max(0, len(body) - (max_len - 2)):]
  seq = [sp.piece_to_id("[CLS]")] + body + [sp.piece_to_id("<|endoftext|>")]
  n = len(seq)
  pad = sp.piece_to_id("<|endoftext|>")
  return seq + [pad] * (max_len - n), [1] * n + [0] * (max_len - n)


# --- the real GLM model ------------------------------------------------------

@pytest.fixture(scope="module")
def glm_tok() -> glm.GLMTokenizer:
  if not GLM_MODEL.exists():
    pytest.skip(f"{GLM_MODEL} not present")
  return glm.GLMTokenizer(str(GLM_MODEL), max_len=52, lowercase=True)


@pytest.fixture(scope="module")
def glm_sp() -> spm.SentencePieceProcessor:
  if not GLM_MODEL.exists():
    pytest.skip(f"{GLM_MODEL} not present")
  return spm.SentencePieceProcessor(model_file=str(GLM_MODEL))


def test_glm_special_ids(glm_tok):
  assert glm_tok.vocab_size == 115244
  assert (glm_tok.cls_id, glm_tok.eos_id, glm_tok.pad_id) == (50002, 50000, 50000)
  assert (glm_tok.mask_id, glm_tok.unk_id) == (50003, 50004)


@pytest.mark.parametrize("text,body", [
    # Verified by hand against the GLM model; guards against regressions.
    ("A photo of a dog.", [778, 51021, 885, 778, 52022, 43369]),
    ("一只狗在草地上奔跑。", [15955, 44355, 43373, 44314, 3198, 12368, 43361]),
    ("hello  world", [62774, 50018, 53584]),
    ("A Man riding 一辆红色的自行车 on the street, 2024年.",
     [778, 14618, 56612, 167, 44931, 11294, 6291, 3487, 631, 52309, 43359, 1356,
      369, 43388, 43369]),
])
def test_glm_hardcoded(glm_tok, text, body):
  ids, mask = glm_tok.encode(text)
  n = len(body) + 2
  assert ids.dtype == np.int32 and mask.dtype == np.int32
  assert ids.shape == mask.shape == (52,)
  assert ids[:n].tolist() == [CLS] + body + [EOS]
  assert (ids[n:] == EOS).all()
  assert mask.tolist() == [1] * n + [0] * (52 - n)


@pytest.mark.parametrize("text", [
    "A photo of a dog.",
    "一只狗在草地上奔跑。",
    "A Man riding 一辆红色的自行车 on the street, 2024年.",
    "a  b",
    "a   b",
    "a" + " " * 10 + "b",
    "a" + " " * 11 + "b",
    "a" + " " * 23 + "b",
    " leading and trailing ",
    "",
])
def test_glm_matches_spec(glm_tok, glm_sp, text):
  ids, mask = glm_tok.encode(text)
  want_ids, want_mask = _expected(glm_sp, text)
  assert ids.tolist() == want_ids
  assert mask.tolist() == want_mask


def test_glm_blank_pieces(glm_tok):
  assert glm_tok.pieces("a  b") == ["▁a", "<|blank_2|>", "b"]
  assert glm_tok.pieces("a   b") == ["▁a", "<|blank_3|>", "b"]
  assert glm_tok.pieces("a" + " " * 10 + "b") == ["▁a", "<|blank_10|>", "b"]
  assert glm_tok.pieces("a" + " " * 11 + "b") == ["▁a", "<|blank_10|>", "▁b"]
  assert glm_tok.decode(glm_tok.encode("a" + " " * 11 + "b")[0]) == "a" + " " * 11 + "b"


def test_glm_truncates_left(glm_tok, glm_sp):
  text = " ".join(f"w{i}" for i in range(80))
  body = glm_sp.encode(text)
  assert len(body) > 50
  ids, mask = glm_tok.encode(text)
  assert ids.tolist() == [CLS] + body[-50:] + [EOS]
  assert mask.sum() == 52
  # The end of the caption survives; its start is dropped.
  assert glm_tok.decode(ids).endswith("w79")
  assert "w0 " not in glm_tok.decode(ids)
  # Exactly 50 pieces fit without truncation.
  fit = glm_sp.decode(body[:50])
  assert glm_tok.encode(fit)[0].tolist() == [CLS] + body[:50] + [EOS]


def test_glm_lowercase_and_quotes(glm_tok):
  assert glm_tok.encode("A DOG")[0].tolist() == glm_tok.encode("a dog")[0].tolist()
  assert glm_tok.pieces("“hi”") == glm_tok.pieces('"hi"')
  cased = glm.GLMTokenizer(str(GLM_MODEL), lowercase=False, straighten_quotes=False)
  assert cased.pieces("A“") == ["▁A", "“"]


def test_glm_special_tokens_in_text(glm_tok):
  # Lower-casing runs first (as the reference evaluation), so "[MASK]" in a
  # caption is ordinary text; without it, HF splits it off, stripping spaces.
  assert 50003 not in glm_tok.encode("a [MASK] b")[0].tolist()
  cased = glm.GLMTokenizer(str(GLM_MODEL), lowercase=False)
  ids, _ = cased.encode("a [MASK] b<|endoftext|>c")
  assert ids[:7].tolist() == [CLS, 778, 50003, 533, 50000, 366, EOS]
  assert cased.pieces("a [MASK] b") == ["▁a", "[MASK]", "▁b"]


def test_glm_batch_and_pickle(glm_tok):
  texts = ["a dog", "一只猫", ""]
  ids, mask = glm_tok.encode_batch(texts)
  assert ids.shape == mask.shape == (3, 52) and ids.dtype == np.int32
  for i, t in enumerate(texts):
    assert ids[i].tolist() == glm_tok.encode(t)[0].tolist()
  clone = pickle.loads(pickle.dumps(glm_tok))
  assert clone.encode("一只狗")[0].tolist() == glm_tok.encode("一只狗")[0].tolist()
  assert clone.model_file == glm_tok.model_file


# --- a small trained model (always runs) ------------------------------------

@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> str:
  out = tmp_path_factory.mktemp("sp") / "small.model"
  return sp_train.train_sentencepiece(CORPUS, str(out), vocab_size=160)


def test_train_is_deterministic(small_model, tmp_path):
  again = sp_train.train_sentencepiece(iter(CORPUS), str(tmp_path / "b.model"), 160)
  assert Path(again).read_bytes() == Path(small_model).read_bytes()


def test_small_model_specials(small_model):
  sp = spm.SentencePieceProcessor(model_file=small_model)
  for piece in glm.USER_DEFINED_PIECES:
    assert sp.id_to_piece(sp.piece_to_id(piece)) == piece
  # Full character coverage: every Chinese character of the corpus is known.
  chars = {c for s in CORPUS for c in s if "\u4e00" <= c <= "\u9fff"}
  assert all(sp.piece_to_id(c) != sp.unk_id() for c in chars)
  tok = glm.GLMTokenizer(small_model, max_len=16)
  assert tok.vocab_size == 160
  assert tok.pad_id == tok.eos_id == sp.piece_to_id("<|endoftext|>")
  assert tok.cls_id == sp.piece_to_id("[CLS]")


def test_small_model_encode(small_model):
  sp = spm.SentencePieceProcessor(model_file=small_model)
  tok = glm.GLMTokenizer(small_model, max_len=16)
  for text in ["Two cats  sleep.", "两只狗在草地上", "a" + " " * 11 + "dog",
               "一只狗在绿色的草地上奔跑。" * 3]:
    ids, mask = tok.encode(text)
    want_ids, want_mask = _expected(sp, text, max_len=16)
    assert ids.tolist() == want_ids and mask.tolist() == want_mask
  assert tok.decode(tok.encode("两只猫在沙发上")[0]) == "两只猫在沙发上"
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode("a dog")[0].tolist() == tok.encode("a dog")[0].tolist()


def test_missing_special_piece_is_named(tmp_path):
  plain = tmp_path / "plain.model"
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS), model_prefix=str(plain.with_suffix("")),
      vocab_size=60, hard_vocab_limit=False, character_coverage=1.0,
      num_threads=1, minloglevel=2,
      user_defined_symbols=["<|endoftext|>"])
  with pytest.raises(ValueError, match=re.escape("[CLS]")):
    glm.GLMTokenizer(str(plain))
