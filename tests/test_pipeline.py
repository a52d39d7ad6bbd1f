"""The grain stream (`bigvl.data.stream`) and the image-text format on it (small shards, CPU only)."""

from __future__ import annotations

import collections
import io
import itertools
import logging

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

import jax.numpy as jnp

from bigvl.data import image_ops
from bigvl.models.layers import vit
from bigvl.data.formats import records
from bigvl.data import stream
from bigvl.data.formats import image_text
from bigvl.tokenizers import glm
from bigvl.tokenizers import sp_train

SIZE = 16
BATCH = 4
PER_FILE = 24
CAPTIONS = ["a red square on grass", "一只红色的猫", "two blue dogs  run",
            "蓝色的天空 and a green tree"]


def _image_bytes(rng: np.random.Generator, fmt: str = "JPEG",
                 shape: tuple[int, int] = (24, 20)) -> bytes:
  pixels = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format=fmt)
  return buf.getvalue()


def _write(path, payloads: list[bytes]) -> str:
  writer = ArrayRecordWriter(str(path), "group_size:1")
  for p in payloads:
    writer.write(p)
  writer.close()
  return str(path)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> glm.GLMTokenizer:
  out = tmp_path_factory.mktemp("tok") / "sp.model"
  sp_train.train_sentencepiece(CAPTIONS * 10, str(out), vocab_size=100)
  return glm.GLMTokenizer(str(out), max_len=12)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
  """Two shards of 24 good records; ids 0..47 in file order."""
  d = tmp_path_factory.mktemp("shards")
  rng = np.random.default_rng(0)
  out = []
  for f in range(2):
    payloads = []
    for i in range(PER_FILE):
      ex_id = f * PER_FILE + i
      payloads.append(records.encode_record({
          "id": ex_id,
          "image": _image_bytes(rng, "PNG" if ex_id % 3 == 0 else "JPEG"),
          "caption": CAPTIONS[ex_id % len(CAPTIONS)],
          "lang": "en"}))
    out.append(_write(d / f"train-{f:05d}.arrayrecord", payloads))
  return out


@pytest.fixture(scope="module")
def bad_file(tmp_path_factory) -> str:
  """Records 0..9 with ids 100+i; 2, 5, 7 and 8 are broken."""
  rng = np.random.default_rng(1)
  payloads = []
  for i in range(10):
    ex = {"id": 100 + i, "image": _image_bytes(rng), "caption": "a cat"}
    if i == 5:
      ex["image"] = b"not an image"
    if i == 7:
      ex["caption"] = "   "
    if i == 8:
      ex["image"] = ex["image"][: len(ex["image"]) // 2]  # Truncated JPEG.
    payloads.append(records.encode_record(ex))
  payloads[2] = b"\xc1\xc1 not msgpack"
  return _write(tmp_path_factory.mktemp("bad") / "bad.arrayrecord", payloads)


def _ids(it, n: int) -> list[list[int]]:
  return [next(it)["id"].tolist() for _ in range(n)]


def _train(files, tok, **kw):
  args = dict(tokenizer=tok, image_size=SIZE, batch_size=BATCH, seed=0)
  args.update(kw)
  return image_text.train_dataset(files, **args)


def test_batch_shapes_and_values(files, tok):
  batch = next(iter(_train(files, tok)))
  assert set(batch) == {"image", "text", "text_mask", "lang", "id"}
  # The caption's language (a captioner's language tag): Han characters are Chinese.
  langs = [image_text.caption_lang(tok.decode(t)) for t in batch["text"]]
  assert batch["lang"].dtype == np.int32 and batch["lang"].tolist() == langs
  assert batch["image"].shape == (BATCH, SIZE, SIZE, 3)
  assert batch["image"].dtype == np.uint8   # a quarter of float32's bytes to the device
  assert batch["image"].max() > 1
  assert batch["text"].shape == batch["text_mask"].shape == (BATCH, 12)
  assert batch["text"].dtype == batch["text_mask"].dtype == np.int32
  assert batch["id"].dtype == np.int64 and batch["id"].shape == (BATCH,)
  for row, ex_id in zip(batch["text"], batch["id"]):
    want, _ = tok.encode(CAPTIONS[ex_id % len(CAPTIONS)])
    assert row.tolist() == want.tolist()


def test_deterministic_and_seeded(files, tok):
  a = _ids(iter(_train(files, tok, seed=3)), 8)
  b = _ids(iter(_train(files, tok, seed=3)), 8)
  c = _ids(iter(_train(files, tok, seed=4)), 8)
  assert a == b
  assert a != c


def test_epochs_reshuffle(files, tok):
  it = iter(_train(files, tok, num_epochs=2))
  ids = list(itertools.chain.from_iterable(b["id"].tolist() for b in it))
  assert len(ids) == 2 * 2 * PER_FILE
  first, second = ids[:2 * PER_FILE], ids[2 * PER_FILE:]
  assert sorted(first) == sorted(second) == list(range(2 * PER_FILE))
  assert first != second
  unshuffled = _ids(iter(_train(files, tok, shuffle=False)), 2)
  assert unshuffled == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("workers", [0, 1])
def test_checkpoint_resume(files, tok, workers):
  k, more = 3, 4
  ref_it = iter(_train(files, tok, worker_count=workers))
  reference = _ids(ref_it, k + more)
  it = iter(_train(files, tok, worker_count=workers))
  _ids(it, k)
  state = it.get_state()
  fresh = iter(_train(files, tok, worker_count=workers))
  fresh.set_state(state)
  assert _ids(fresh, more) == reference[k:]
  for i in (ref_it, it, fresh):
    if hasattr(i, "close"):
      i.close()


def test_block_sharding(files, tok):
  per_proc = []
  for p in range(2):
    it = iter(_train(files, tok, block=p, blocks=2,
                     num_epochs=1))
    per_proc.append([i for b in it for i in b["id"].tolist()])
  assert len(per_proc[0]) == len(per_proc[1]) == PER_FILE
  assert not set(per_proc[0]) & set(per_proc[1])
  assert sorted(per_proc[0] + per_proc[1]) == list(range(2 * PER_FILE))


def test_eval_examples_cover_once(files, tok):
  seen, batches = [], []
  for p in range(3):
    out = list(image_text.eval_examples(files, tokenizer=tok, image_size=SIZE,
                                        batch_size=5, block=p, blocks=3))
    batches.append(len(out))
    for b in out:
      assert b["image"].shape == (5, SIZE, SIZE, 3)
      assert b["valid"].dtype == bool
      assert (b["id"][~b["valid"]] == -1).all()
      assert (b["text_mask"].sum(axis=1) >= 2).all()
      seen.extend(b["id"][b["valid"]].tolist())
  # 48 records / 3 blocks = 16 each -> 4 batches of 5, 4 padding rows.
  assert batches == [4, 4, 4]
  assert sorted(seen) == list(range(2 * PER_FILE))
  # Within a block, file order.
  first = next(image_text.eval_examples(files, tokenizer=tok, image_size=SIZE,
                                        batch_size=5, blocks=3))
  assert first["id"].tolist() == [0, 3, 6, 9, 12]


def test_eval_pixels_match_reference_transform(files, tok):
  batch = next(image_text.eval_examples(files, tokenizer=tok, image_size=SIZE,
                                        batch_size=2))
  raw = image_text.load_examples(files)[1]
  img = Image.open(io.BytesIO(raw["image"])).convert("RGB")
  img = img.resize((SIZE, SIZE), Image.Resampling.BICUBIC)
  want = (np.asarray(img, np.float32) / 255.0 - 0.5) / 0.5
  assert batch["image"].dtype == np.uint8
  on_device = vit.normalize_pixels(jnp.asarray(batch["image"]))   # where the model normalises
  np.testing.assert_array_equal(np.asarray(on_device)[1], want)
  np.testing.assert_array_equal(
      image_text.preprocess_image(raw["image"], SIZE), want)


def test_corrupt_records_skipped_and_counted(bad_file, tok, caplog):
  stream.reset_skipped_counts()
  with caplog.at_level(logging.WARNING, logger=stream.__name__):
    it = iter(image_text.train_dataset(
        [bad_file], tokenizer=tok, image_size=SIZE, batch_size=2, seed=0,
        shuffle=False, num_epochs=1))
    ids = [i for b in it for i in b["id"].tolist()]
  assert ids == [100, 101, 103, 104, 106, 109]
  assert stream.skipped_counts() == {
      image_text.BAD_RECORD: 1, image_text.BAD_IMAGE: 2, image_text.BAD_CAPTION: 1}
  assert "file 0" in caplog.text and "record 2 " in caplog.text
  assert "record 8 " in caplog.text

  out = list(image_text.eval_examples([bad_file], tokenizer=tok,
                                      image_size=SIZE, batch_size=4))
  valid = np.concatenate([b["valid"] for b in out])
  assert valid.tolist() == [i not in (2, 5, 7, 8) for i in range(10)] + [False] * 2
  with pytest.raises(records.RecordError, match="record 2"):
    image_text.load_examples([bad_file])


class _Numbers:
  """A random-access source of records b"0", b"1", ...: a format the stream has never heard of."""

  def __len__(self):
    return 20

  def __getitem__(self, i):
    return str(i).encode()


def _parse_number(raw: bytes):
  n = int(raw)
  if n % 5 == 0:
    raise stream.RecordFailure("multiple_of_five", ValueError(n))
  return {"id": np.int64(n), "square": n * n}


def _collate_numbers(examples):
  return {"id": np.asarray([e["id"] for e in examples], np.int64),
          "square": np.asarray([e["square"] for e in examples])}


def test_the_stream_takes_any_format():
  reasons = (stream.BAD_RECORD, "multiple_of_five")
  it = iter(stream.train_stream(_Numbers(), parse=_parse_number, collate=_collate_numbers,
                                reasons=reasons, batch_size=4, seed=0, shuffle=False,
                                num_epochs=1))
  batches = list(it)
  assert [b["id"].tolist() for b in batches] == [[1, 2, 3, 4], [6, 7, 8, 9], [11, 12, 13, 14],
                                                 [16, 17, 18, 19]]
  assert set(batches[0]) == {"id", "square"} and batches[0]["square"].tolist() == [1, 4, 9, 16]
  assert it.stats() == {"data/served": 16, "data/skipped": 4, "data/skipped_shards": 0,
                        "data/skipped/bad_record": 0, "data/skipped/multiple_of_five": 4}
  with pytest.raises(ValueError, match="lack 'bad_record'"):
    stream.train_stream(_Numbers(), parse=_parse_number, collate=_collate_numbers,
                        reasons=("multiple_of_five",), batch_size=4, seed=0)
  with pytest.raises(ValueError, match="not one of the format's reasons"):
    next(iter(stream.train_stream(_Numbers(), parse=_parse_number, collate=_collate_numbers,
                                  reasons=(stream.BAD_RECORD,), batch_size=4, seed=0,
                                  shuffle=False)))


def test_load_examples(files):
  examples = image_text.load_examples(files)
  assert [e["id"] for e in examples] == list(range(2 * PER_FILE))
  assert examples[0]["caption"] == CAPTIONS[0]


def test_image_ops_draft_and_normalize():
  rng = np.random.default_rng(2)
  smooth = np.linspace(0, 255, 256 * 192 * 3).reshape(192, 256, 3)
  buf = io.BytesIO()
  Image.fromarray(smooth.astype(np.uint8)).save(buf, format="JPEG", quality=95)
  data = buf.getvalue()
  full = image_ops.decode_image(data, 32, draft=False)
  fast = image_ops.decode_image(data, 32, draft=True)
  assert full.shape == fast.shape == (32, 32, 3) and full.dtype == np.uint8
  assert np.abs(full.astype(int) - fast.astype(int)).mean() < 3
  gray = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8)).save(gray, "PNG")
  assert image_ops.decode_image(gray.getvalue(), 10).shape == (10, 10, 3)
  x = image_ops.normalize(np.array([0, 255, 128], np.uint8))
  assert x.dtype == np.float32
  np.testing.assert_allclose(x, [-1.0, 1.0, 128 / 127.5 - 1], atol=1e-6)


def test_the_train_step_receives_uint8_images(tiny_world):
  """The M²-Encoder step is lowered for uint8 images (normalised inside it), the loop's batches are
  uint8, and the model gives the same embeddings for uint8 pixels as for the host-normalised
  floats."""
  from conftest import small_config
  from bigvl.train import loop
  t = loop.build(small_config(tiny_world))
  assert t.batch_spec["image"].dtype == np.uint8
  state, frozen = t.shapes()
  hlo = t.step_fn.lower(state, frozen, t.batch_spec).as_text()
  b, s = t.batch_spec["image"].shape[:2]
  assert f"tensor<{b}x{s}x{s}x3xui8>" in hlo
  t.system.prepare()
  batch = next(t.system.train_data(4, 0, 1))
  assert batch["image"].dtype == np.uint8
  from flax import nnx
  model = t.system.make_model(nnx.Rngs(0))
  as_uint8 = model.encode_image(jnp.asarray(batch["image"]))
  as_float = model.encode_image(jnp.asarray(image_ops.normalize(batch["image"])))
  np.testing.assert_array_equal(np.asarray(as_uint8), np.asarray(as_float))


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def test_every_image_mode_decodes_as_documented(tmp_path):
  """16-bit grey scaled (not clipped to white), palette with a transparent index, LA and RGBA
  composed onto the documented background, CMYK converted: in training/eval decoding, and the same
  pixels whether the shard builder keeps the bytes or re-encodes them."""
  from data_pipelines import jsonl_to_shards
  ramp16 = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
  got = image_ops.decode_image(_encoded(Image.fromarray(ramp16), "PNG"), 16, draft=False)
  np.testing.assert_array_equal(got[..., 0], np.rint(ramp16 / 257.0).astype(np.uint8))
  assert (got[..., 0] == got[..., 2]).all() and got.min() == 0 and got.max() == 255

  bg = np.array(image_ops.BACKGROUND, np.uint8)
  rgba = np.zeros((16, 16, 4), np.uint8)
  rgba[..., 0] = 200                 # red, transparent on the left half, opaque on the right
  rgba[:, 8:, 3] = 255
  la = np.stack([np.full((16, 16), 40, np.uint8), rgba[..., 3]], -1)
  pal = Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
  pal_px = np.asarray(pal).copy()
  pal_px[:, :8] = 3
  pal = Image.fromarray(pal_px, "P")
  pal.putpalette([200, 0, 0] * 3 + [0, 0, 0])
  cases = {
      "RGBA": (Image.fromarray(rgba, "RGBA"), [200, 0, 0]),
      "LA": (Image.fromarray(la, "LA"), [40, 40, 40]),
      "P": (pal, [200, 0, 0]),
  }
  for mode, (img, opaque) in cases.items():
    data = _encoded(img, "PNG", **({"transparency": 3} if mode == "P" else {}))
    px = image_ops.decode_image(data, 16, draft=False)
    np.testing.assert_array_equal(px[:, :8], np.broadcast_to(bg, (16, 8, 3)), err_msg=mode)
    np.testing.assert_array_equal(px[:, 8:], np.broadcast_to(np.uint8(opaque), (16, 8, 3)),
                                  err_msg=mode)
    path = tmp_path / f"{mode}.png"
    path.write_bytes(data)
    kept = jsonl_to_shards.load_image(str(path), None)               # bytes kept as they are
    assert kept == data
    redone = jsonl_to_shards.load_image(str(path), 8)                # downscaled, re-encoded
    small = image_ops.decode_image(redone, 8, draft=False).astype(int)
    want = image_ops.decode_image(kept, 8, draft=False).astype(int)
    assert np.abs(small[:, :3] - want[:, :3]).max() <= 8, mode      # the transparent side: bg
    assert np.abs(small[:, 5:] - want[:, 5:]).max() <= 8, mode

  cmyk = _encoded(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
  px = image_ops.decode_image(cmyk, 16)
  assert np.abs(px.astype(int) - [255, 0, 0]).max() <= 8


def test_every_caption_of_a_record_is_drawn_across_epochs_and_resumes(tmp_path, tok):
  """A record with meta.captions = [...] (build_shards keeps every caption) trains on one of them
  per pass, drawn by stream position: over epochs each caption appears, the draw does not depend
  on the block split, and a resumed stream draws the same."""
  rng = np.random.default_rng(4)
  caps = [CAPTIONS[0], CAPTIONS[1], CAPTIONS[2]]
  payloads = [records.encode_record({"id": i, "image": _image_bytes(rng), "caption": caps[0],
                                     "meta": {"captions": caps}}) for i in range(8)]
  files = [_write(tmp_path / "multi.arrayrecord", payloads)]
  want = {tuple(tok.encode(c)[0].tolist()): c for c in caps}
  it = iter(_train(files, tok, batch_size=4))
  seen = collections.defaultdict(set)
  texts = []
  for _ in range(12):                                  # 6 epochs of 8 records
    b = next(it)
    texts.append(b["text"].tolist())
    for ex_id, row in zip(b["id"].tolist(), b["text"].tolist()):
      seen[ex_id].add(want[tuple(row)])
  assert all(len(v) >= 2 for v in seen.values()) and set().union(*seen.values()) == set(caps)
  it = iter(_train(files, tok, batch_size=4))
  for _ in range(5):
    next(it)
  state = it.get_state()
  again = iter(_train(files, tok, batch_size=4))
  again.set_state(state)
  assert [next(again)["text"].tolist() for _ in range(7)] == texts[5:]
  halves = [iter(_train(files, tok, batch_size=2, block=k, blocks=2)) for k in range(2)]
  first = [r for h in halves for r in next(h)["text"].tolist()]
  assert first == texts[0]
