"""launch/build_shards.py's other inputs: webdataset tars (img2dataset's layout) and parquet files,
their bad samples and bad flags, and training on what they produce."""

import glob
import io
import json
import math
import os
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import REPO, small_config
from bigvl.data.formats import image_text
from data_pipelines import webdataset_to_shards

EN, ZH = "a dog on the beach", "一只狗在海滩上"
AR = "قطة على الشاطئ"                               # no tag: neither Han nor ASCII
MIXED = "東京タワー\u200b🗼 at\tnight"                # zero-width space, emoji, tab: kept as they are


def _image(seed: int, fmt: str = "JPEG", size: int = 32) -> bytes:
  rng = np.random.default_rng(seed)
  ramp = np.linspace(0, 255, size, dtype=np.float32)
  px = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1),
                 np.full((size, size), 40.0 * (seed % 6))], -1)
  px = np.clip(px + rng.normal(0, 20, px.shape), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(px).save(buf, fmt)
  return buf.getvalue()


def _tar(path, samples):
  """samples: [(key, {ext: bytes or str or dict})], written in img2dataset's member order."""
  with tarfile.open(path, "w") as tf:
    for key, members in samples:
      for ext, data in members.items():
        if isinstance(data, dict):
          data = json.dumps(data, ensure_ascii=False)
        if isinstance(data, str):
          data = data.encode("utf-8")
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
  return str(path)


def _cli(*args):
  return subprocess.run([sys.executable, "launch/build_shards.py", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


def _summary(result):
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def _records(out_dir):
  files = sorted(glob.glob(os.path.join(out_dir, "train-*.array_record")))
  return {r["id"]: r for r in image_text.load_examples(files)}


# ------------------------------------------------------------------ webdataset tars

@pytest.fixture(scope="module")
def tars(tmp_path_factory):
  """Two img2dataset-style tars: 22 samples, 4 of them bad; and the images the good ones hold."""
  d = tmp_path_factory.mktemp("wds")
  img = {k: _image(k) for k in range(22)}
  png = _image(99, "PNG")
  meta = lambda k, **kw: {"url": f"http://x/{k}.jpg", "key": f"{k:09d}", "status": "success", **kw}
  first = [
      (f"{0:09d}", {"jpg": img[0], "txt": EN, "json": meta(0, caption=EN)}),                # id 1
      (f"{1:09d}", {"jpg": img[1], "txt": ZH, "json": meta(1, caption=ZH)}),                # id 2
      (f"{2:09d}", {"jpg": img[2], "txt": "两只猫",                                           # id 3
                    "json": meta(2, caption=["两只猫", " two cats ", "", AR])}),
      (f"{3:09d}", {"jpg": b"\xff\xd8\xff\xe0 not a jpeg at all", "txt": "broken"}),       # id 4
      (f"{4:09d}", {"txt": "a caption without its image", "json": meta(4)}),               # id 5
      (f"{5:09d}", {"jpg": img[5], "txt": "  café au lait \n", "json": meta(5, lang="fr")}),  # 6
  ]
  second = [
      (f"{6:09d}", {"jpg": img[6], "txt": "x", "json": "{not json"}),                      # id 7
      (f"{7:09d}", {"jpg": img[7], "txt": "   \n", "json": meta(7)}),                      # id 8
      (f"{8:09d}", {"png": png, "txt": "a red square", "json": meta(8)}),                  # id 9
      (f"{9:09d}", {"jpg": img[9], "txt": AR}),                                            # id 10
      (f"{10:09d}", {"webp": _image(10, "WEBP"), "txt": MIXED}),                           # id 11
      (f"{11:09d}", {"jpg": img[11], "json": meta(11, caption=EN.upper())}),               # id 12
  ] + [(f"{k:09d}", {"jpg": img[k], "txt": f"picture number {k}", "json": meta(k)})        # 13..22
       for k in range(12, 22)]
  _tar(d / "shard-00000.tar", first)
  _tar(d / "shard-00001.tar", second)
  return d, img, png


@pytest.fixture(scope="module")
def wds_build(tars, tmp_path_factory):
  d, _, _ = tars
  out = str(tmp_path_factory.mktemp("wds_out") / "shards")
  result = _cli(f"--input={d}/shard-{{00000..00001}}.tar", f"--output_dir={out}",
                "--num_shards=2", "--num_workers=2", "--max_skip_fraction=0.5")
  return out, _summary(result)


def test_webdataset_tars_convert_with_every_caption_and_language(tars, wds_build):
  _, img, png = tars
  out, summary = wds_build
  assert summary["input_format"] == "webdataset" and summary["input_files"] == 2
  assert summary["written"] == 18 and summary["skipped"] == 4, summary
  assert summary["skipped_by_reason"] == {"undecodable image": 1, "missing image": 1,
                                          "malformed json": 1, "empty caption": 1}
  skipped = {s["id"]: s for s in summary["skipped_examples"]}
  assert sorted(skipped) == [4, 5, 7, 8]
  assert skipped[4]["source"] == "shard-00000.tar:000000003"
  assert skipped[4]["reason"].startswith("undecodable image: 000000003.jpg")
  assert skipped[5]["source"] == "shard-00000.tar:000000004"
  assert skipped[5]["reason"].startswith("missing image")
  assert skipped[7]["source"] == "shard-00001.tar:000000006"
  assert skipped[7]["reason"].startswith("malformed json: 000000006.json")
  assert skipped[8] == {"source": "shard-00001.tar:000000007", "id": 8, "reason": "empty caption"}
  assert summary["images_per_s"] > 0 and summary["seconds"] > 0
  assert summary["num_shards"] == 2 and not summary["reused"]

  recs = _records(out)
  # ids: one running index over both tars, in input order
  assert sorted(recs) == [1, 2, 3, 6, 9, 10, 11, 12] + list(range(13, 23))
  assert recs[1]["caption"] == EN and recs[1]["lang"] == "en"
  assert recs[1]["image"] == img[0]                     # small JPEG: kept byte for byte
  assert recs[1]["meta"] == {"source": "shard-00000.tar:000000000"}
  assert recs[2]["caption"] == ZH and recs[2]["lang"] == "zh"
  # The list in the .json wins over the .txt; every non-empty caption kept, trimmed, tagged.
  assert recs[3]["caption"] == "两只猫" and recs[3]["lang"] == "zh"
  assert recs[3]["meta"]["captions"] == ["两只猫", "two cats", AR]
  assert recs[3]["meta"]["langs"] == ["zh", "en", None]
  assert recs[6]["caption"] == "café au lait" and recs[6]["lang"] == "fr"    # the sample's lang
  assert recs[9]["image"] == png and recs[9]["meta"]["source"] == "shard-00001.tar:000000008"
  assert recs[10]["caption"] == AR and "lang" not in recs[10]
  assert recs[11]["caption"].encode() == MIXED.encode() and recs[11]["lang"] == "zh"
  assert Image.open(io.BytesIO(recs[11]["image"])).format == "JPEG"          # WebP re-encoded
  assert recs[12]["caption"] == EN.upper()                                   # from the .json
  assert recs[22]["meta"]["source"] == "shard-00001.tar:000000021" and recs[22]["image"] == img[21]
  for r in recs.values():
    Image.open(io.BytesIO(r["image"])).load()

  again = _summary(_cli(f"--input={tars[0]}/shard-{{00000..00001}}.tar", f"--output_dir={out}",
                        "--num_shards=2", "--num_workers=2", "--max_skip_fraction=0.5"))
  assert again["reused"] and again["written"] == 18


def test_a_truncated_or_corrupt_tar_keeps_what_was_read(tmp_path, tars):
  img = tars[1]
  samples = [(f"s{k}", {"jpg": img[k], "txt": f"caption {k}"}) for k in range(4)]
  good = _tar(tmp_path / "good.tar", samples)
  data = open(good, "rb").read()
  cut = data.index(img[2]) + len(img[2]) // 2          # in the middle of the third image
  (tmp_path / "cut.tar").write_bytes(data[:cut])
  # Garbage over the third sample's first header: tarfile would just stop there, silently.
  header = data.index(b"s2.jpg")
  (tmp_path / "bad.tar").write_bytes(data[:header] + b"\x07garbage!" * 64 + data[header + 576:])
  summary = webdataset_to_shards.convert(
      [good, str(tmp_path / "cut.tar"), str(tmp_path / "bad.tar")], tmp_path / "out",
      num_workers=2)
  assert summary["written"] == 4 + 2 + 2
  assert summary["skipped"] == 2 and summary["skipped_by_reason"] == {"unreadable tar": 2}, summary
  reasons = {s["source"]: s["reason"] for s in summary["skipped_examples"]}
  assert reasons["cut.tar"].startswith("unreadable tar: cut.tar: ")
  assert reasons["bad.tar"].startswith("unreadable tar: bad.tar: ")
  recs = _records(tmp_path / "out")
  assert sorted(recs) == [1, 2, 3, 4, 5, 6, 7, 8]
  assert sorted(r["meta"]["source"] for r in recs.values()) == sorted(
      [f"good.tar:s{k}" for k in range(4)] + ["cut.tar:s0", "cut.tar:s1",
                                              "bad.tar:s0", "bad.tar:s1"])


# ------------------------------------------------------------------ parquet

def test_parquet_with_image_bytes_and_huggingface_structs(tmp_path):
  img = {k: _image(k) for k in range(8)}
  (tmp_path / "rel.jpg").write_bytes(img[7])
  pq.write_table(pa.table({
      "caption": [EN, ZH, "no image", "bad image", "", None],
      "image": [img[0], img[1], None, b"not an image", img[4], img[5]],
      "url": [f"http://x/{i}" for i in range(6)],
  }), tmp_path / "part-0.parquet", row_group_size=4)
  struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
  pq.write_table(pa.table({
      "caption": pa.array([[ZH, EN], ["  a cat  "]], pa.list_(pa.string())),
      "image": pa.array([{"bytes": img[6], "path": "x.jpg"}, {"bytes": None, "path": "rel.jpg"}],
                        struct),
  }), tmp_path / "part-1.parquet")
  out = str(tmp_path / "out")
  summary = _summary(_cli(f"--input={tmp_path}/part-*.parquet", f"--output_dir={out}",
                          "--num_workers=2", "--max_skip_fraction=0.6"))
  assert summary["input_format"] == "parquet" and summary["images_per_s"] > 0
  assert summary["written"] == 4 and summary["skipped"] == 4
  assert summary["skipped_by_reason"] == {"missing image": 1, "undecodable image": 1,
                                          "empty caption": 1, "missing caption": 1}
  assert {s["source"]: s["id"] for s in summary["skipped_examples"]} == {
      "part-0.parquet:row 2": 3, "part-0.parquet:row 3": 4, "part-0.parquet:row 4": 5,
      "part-0.parquet:row 5": 6}
  recs = _records(out)
  assert sorted(recs) == [1, 2, 7, 8]
  assert recs[1]["caption"] == EN and recs[1]["image"] == img[0] and recs[1]["lang"] == "en"
  assert recs[2]["caption"] == ZH and recs[2]["lang"] == "zh"
  assert recs[2]["meta"] == {"source": "part-0.parquet:row 1"}
  assert recs[7]["caption"] == ZH and recs[7]["meta"]["captions"] == [ZH, EN]
  assert recs[7]["meta"]["langs"] == ["zh", "en"] and recs[7]["image"] == img[6]
  assert recs[8]["caption"] == "a cat" and recs[8]["image"] == img[7]   # the struct's path


def test_parquet_with_image_paths(tmp_path):
  (tmp_path / "imgs").mkdir()
  a, b = _image(1), _image(2, "PNG", size=80)
  (tmp_path / "imgs" / "a.jpg").write_bytes(a)
  (tmp_path / "b.png").write_bytes(b)
  pq.write_table(pa.table({
      "text": [ZH, "absolute path", "gone"],
      "file": ["imgs/a.jpg", str(tmp_path / "b.png"), "imgs/missing.jpg"],
      "lang": ["zh-Hans", None, "en"],
  }), tmp_path / "paths.parquet")
  out = str(tmp_path / "out")
  summary = _summary(_cli(f"--input={tmp_path}/paths.parquet", f"--output_dir={out}",
                          "--caption_column=text", "--image_path_column=file", "--image_size=40",
                          "--num_workers=2", "--max_skip_fraction=0.5"))
  assert summary["written"] == 2 and summary["skipped_by_reason"] == {"missing file": 1}
  (missing,) = summary["skipped_examples"]
  assert missing["source"] == "paths.parquet:row 2" and "imgs/missing.jpg" in missing["reason"]
  recs = _records(out)
  assert recs[1]["image"] == a and recs[1]["lang"] == "zh-Hans"   # the row's own lang column
  assert recs[2]["lang"] == "en"
  assert Image.open(io.BytesIO(recs[2]["image"])).size == (40, 40)   # 80 px PNG downscaled


# ------------------------------------------------------------------ bad flags: one line, exit 1

def _fails(*args) -> str:
  result = _cli(*args)
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("build_shards.py: "), result.stderr
  return lines[0]


def test_bad_flags_fail_on_one_line(tmp_path, tars):
  d = tars[0]
  out = f"--output_dir={tmp_path / 'out'}"
  assert "--input is required" in _fails(out)
  assert f"{d}/nothing-*.tar" in _fails(f"--input={d}/nothing-*.tar", out)
  assert f"{d}/shard-00002.tar" in _fails(f"--input={d}/shard-{{00000..00002}}.tar", out)
  (tmp_path / "a_file").write_text("x")
  line = _fails(f"--input={d}/shard-00000.tar", f"--output_dir={tmp_path / 'a_file'}")
  assert "a_file" in line and "not a directory" in line
  assert "--num_shards=0" in _fails(f"--input={d}/shard-00000.tar", out, "--num_shards=0")
  assert "--num_shards=-2" in _fails(f"--input={d}/shard-00000.tar", out, "--num_shards=-2")
  assert "--image_size=0" in _fails(f"--input={d}/shard-00000.tar", out, "--image_size=0")
  assert "--image_size=-5" in _fails(f"--input={d}/shard-00000.tar", out, "--image_size=-5")
  pq.write_table(pa.table({"text": ["x"], "jpg": [b"y"]}), tmp_path / "t.parquet")
  line = _fails(f"--input={tmp_path}/t.parquet", out)
  assert "'caption'" in line and "text, jpg" in line
  line = _fails(f"--input={tmp_path}/t.parquet", out, "--caption_column=text")
  assert "'image'" in line and "text, jpg" in line
  assert not os.path.exists(tmp_path / "out" / "manifest.json")


# ------------------------------------------------------------------ and training on the result

def test_training_runs_on_converted_tars(tiny_world, wds_build, tmp_path):
  """A few steps on the converted tars' shards (and their Chinese and English captions). The
  model, batch (16) and steps (4) are small_config's, as in tests/test_train.py: the compiled step
  is then the one those tests compile, which the session's compilation cache holds once."""
  from bigvl.train import loop
  out, _ = wds_build
  off = {f"evals.{name}.source": "" for name in ("zeroshot", "zeroshot_all", "retrieval")}
  c = small_config(tiny_world, checkpoint_every=4, **off)
  assert (c.batch_size, c.total_steps) == (16, 4)
  c.data.kind = "shards"
  c.data.train_files = os.path.join(out, "train-*.array_record")
  c.tokenizer.path = os.path.join(tiny_world, "tokenizer.model")
  wd = str(tmp_path / "run")
  result = loop.train(c, wd)
  assert math.isfinite(result["train/loss"]) and result["train/loss"] > 0, result
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
  assert len(losses) == 4 and all(math.isfinite(l) for l in losses), losses
