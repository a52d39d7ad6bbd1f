"""Shard building: the embedded synthetic world and the JSONL converter/CLI."""

import io
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image

from data_pipelines import build_world, jsonl_to_shards, parallel, shard_writer
from data_pipelines import synthetic_world as w

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(num_train=300, num_eval=60, num_shards=2, num_corpus_captions=2000)


def _read_split(directory: Path, entry: dict) -> list[dict]:
  return [r for s in entry["shards"] for r in shard_writer.read_shard(directory / s["file"])]


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Path:
  out = tmp_path_factory.mktemp("world") / "ds"
  build_world.build(out, num_workers=2, **SMALL)
  return out


def test_small_build_writes_readable_shards(small_world):
  manifest = shard_writer.read_manifest(small_world)
  names = sorted(p.name for p in small_world.iterdir())
  assert names == sorted([
      "manifest.json", "world.json", "tokenizer.model",
      "train-00000-of-00002.array_record", "train-00001-of-00002.array_record",
      "eval_heldout-00000-of-00001.array_record", "eval_seen-00000-of-00001.array_record"])
  counts = {k: v["num_records"] for k, v in manifest["splits"].items()}
  assert counts == {"train": 300, "eval_heldout": 60, "eval_seen": 60}
  train = _read_split(small_world, manifest["splits"]["train"])
  assert [r["id"] for r in train] == list(range(300))
  assert not any(r["meta"]["class"] in w.HELD_OUT for r in train)
  heldout = _read_split(small_world, manifest["splits"]["eval_heldout"])
  assert all(r["meta"]["held_out"] and set(r["meta"]["captions"]) == {"en", "zh"}
             for r in heldout)
  # Shards hold exactly what the world function generates.
  assert train[123] == w.make_example(0, "train", 123)
  world = json.loads((small_world / "world.json").read_text())
  assert world["held_out"] == w.HELD_OUT and len(world["classes"]) == len(w.CLASSES)
  assert world["params"] == manifest["params"]


def test_tokenizer_keeps_words_and_chinese_characters(small_world):
  sp = spm.SentencePieceProcessor(model_file=str(small_world / "tokenizer.model"))
  assert sp.get_piece_size() == build_world.DEFAULT_VOCAB_SIZE
  pieces = sp.encode("two small red circles on a striped background", out_type=str)
  assert pieces == ["▁two", "▁small", "▁red", "▁circles", "▁on", "▁a", "▁striped", "▁background"]
  # Chinese stays single characters: a held-out class name is then made only
  # of pieces that training captions use.
  zh = sp.encode("条纹背景上有两个小的红色圆形", out_type=str)
  assert [p for p in zh if p != "▁"] == list("条纹背景上有两个小的红色圆形")
  assert sp.unk_id() not in sp.encode("".join(c["zh"] for c in w.CLASSES))


def test_second_build_reuses(small_world):
  before = {p.name: p.stat().st_mtime_ns for p in small_world.iterdir()}
  manifest = build_world.build(small_world, num_workers=2, **SMALL)
  assert manifest == shard_writer.read_manifest(small_world)
  assert before == {p.name: p.stat().st_mtime_ns for p in small_world.iterdir()}


def test_output_independent_of_worker_count(small_world, tmp_path):
  one = build_world.build(tmp_path / "one", num_workers=1, **SMALL)
  assert one["digest"] == shard_writer.read_manifest(small_world)["digest"]
  a = (tmp_path / "one" / "tokenizer.model").read_bytes()
  assert a == (small_world / "tokenizer.model").read_bytes()


def test_changed_params_rebuild_and_foreign_dirs_are_kept(small_world, tmp_path):
  out = tmp_path / "ds"
  build_world.build(out, num_workers=1, **SMALL)
  manifest = build_world.build(out, num_workers=1, **(SMALL | {"num_train": 200}))
  assert manifest["splits"]["train"]["num_records"] == 200
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # No staging left.
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "precious.txt").write_text("x")
  with pytest.raises(FileExistsError):
    build_world.build(foreign, num_workers=1, **SMALL)
  assert (foreign / "precious.txt").exists()


def test_default_dir(monkeypatch, tmp_path):
  monkeypatch.setenv("BIGVL_DATA_DIR", str(tmp_path))
  assert build_world.default_dir() == tmp_path
  monkeypatch.delenv("BIGVL_DATA_DIR")
  assert build_world.default_dir(64).name == f"synthetic_world_v{build_world.WORLD_VERSION}_64"


def _square_or_die(x: int) -> int:
  if multiprocessing.parent_process() is not None and x == 5:
    os._exit(1)  # A worker dying, as spawned ones do when __main__ cannot be imported.
  return x * x


def test_parallel_imap_is_ordered_and_survives_a_broken_pool(monkeypatch, caplog):
  assert list(parallel.imap(abs, range(-50, 0), num_workers=2, chunk_size=3)) == list(
      range(50, 0, -1))
  monkeypatch.setattr(parallel, "_context", lambda: multiprocessing.get_context("spawn"))
  assert list(parallel.imap(abs, range(-9, 0), num_workers=2)) == list(range(9, 0, -1))
  assert list(parallel.imap(_square_or_die, range(40), num_workers=2, chunk_size=2)) == [
      x * x for x in range(40)]
  assert "continuing in this process" in caplog.text


# --------------------------------------------------------------------------- #
# JSONL -> shards
# --------------------------------------------------------------------------- #


def _jpeg(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> None:
  Image.new("RGB", size, colour).save(path, format="JPEG")


@pytest.fixture
def jsonl(tmp_path) -> Path:
  images = tmp_path / "imgs"
  images.mkdir()
  _jpeg(images / "a.jpg", (40, 30), (200, 0, 0))
  _jpeg(images / "big.jpg", (300, 200), (0, 200, 0))
  rgba = Image.new("RGBA", (20, 20), (0, 0, 255, 128))
  rgba.save(images / "c.png")
  (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
  good_abs = str(images / "a.jpg")
  lines = [
      json.dumps({"image": "imgs/a.jpg", "caption": "a red picture"}),                   # 1
      json.dumps({"image": "imgs/big.jpg", "captions": ["绿色的图片", "a green one"]}),  # 2
      json.dumps({"image": "imgs/missing.jpg", "caption": "gone"}),                     # 3
      json.dumps({"image": "imgs/corrupt.jpg", "caption": "broken"}),                   # 4
      json.dumps({"image": "imgs/c.png", "caption": "   "}),                            # 5
      '{"image": "imgs/a.jpg", "caption": ',                                            # 6
      json.dumps({"image": "imgs/c.png", "caption": "a blue square"}),                  # 7
      "",                                                                               # 8
      json.dumps({"image": good_abs, "caption": "absolute path"}),                      # 9
  ]
  path = tmp_path / "pairs.jsonl"
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def test_convert_writes_good_lines_and_reports_bad_ones(jsonl, tmp_path):
  out = tmp_path / "shards"
  summary = jsonl_to_shards.convert(jsonl, out, num_shards=2, image_size=64, num_workers=1)
  assert summary["written"] == 4 and summary["skipped"] == 4 and not summary["reused"]
  reasons = {s["line"]: s["reason"] for s in summary["skipped_examples"]}
  assert sorted(reasons) == [3, 4, 5, 6]
  assert reasons[3].startswith("missing file")
  assert reasons[4].startswith("undecodable image")
  assert reasons[5] == "empty caption"
  assert reasons[6].startswith("malformed json line")

  entry = shard_writer.read_manifest(out)["splits"]["train"]
  assert [s["num_records"] for s in entry["shards"]] == [2, 2]
  records = {r["id"]: r for r in _read_split(out, entry)}
  assert sorted(records) == [1, 2, 7, 9]
  big = records[2]
  assert big["caption"] == "绿色的图片" and big["lang"] == "zh"
  assert big["meta"]["captions"] == ["绿色的图片", "a green one"]
  assert Image.open(io.BytesIO(big["image"])).size == (96, 64)  # Shorter side -> 64.
  small = records[1]
  assert small["lang"] == "en"
  # Small enough already: stored as is, neither upscaled nor re-encoded.
  assert small["image"] == (jsonl.parent / "imgs" / "a.jpg").read_bytes()

  again = jsonl_to_shards.convert(jsonl, out, num_shards=2, image_size=64, num_workers=1)
  assert again["reused"] and again["written"] == 4


def test_convert_keeps_bytes_without_image_size_and_replaces_split(jsonl, tmp_path):
  out = tmp_path / "shards"
  jsonl_to_shards.convert(jsonl, out, num_shards=3, num_workers=1)
  jsonl_to_shards.convert(jsonl, out, split="val", num_shards=1, num_workers=1)
  summary = jsonl_to_shards.convert(jsonl, out, num_shards=1, num_workers=1)
  assert summary["num_shards"] == 1
  names = sorted(p.name for p in out.glob("*.array_record"))
  assert names == ["train-00000-of-00001.array_record", "val-00000-of-00001.array_record"]
  manifest = shard_writer.read_manifest(out)
  records = {r["id"]: r for r in _read_split(out, manifest["splits"]["train"])}
  assert records[7]["image"] == (jsonl.parent / "imgs" / "c.png").read_bytes()
  assert set(manifest["splits"]) == {"train", "val"}


def _cli(*args: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  return subprocess.run([sys.executable, str(REPO / "launch" / "build_shards.py"), *args],
                        capture_output=True, text=True, cwd="/", env=env, timeout=120)


def test_cli_prints_summary_and_fails_when_nothing_written(jsonl, tmp_path):
  result = _cli(f"--input={jsonl}", f"--output_dir={tmp_path / 'out'}", "--num_shards=2",
                "--num_workers=1", "--max_skip_fraction=0.5")
  assert result.returncode == 0, result.stderr
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["written"] == 4 and summary["skipped"] == 4
  assert len(summary["skipped_examples"]) == 4
  assert summary["skipped_by_reason"] == {"missing file": 1, "undecodable image": 1,
                                          "empty caption": 1, "malformed json line": 1}

  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"image": "nope.jpg", "caption": "x"}\nnot json\n')
  result = _cli(f"--input={bad}", f"--output_dir={tmp_path / 'out2'}")
  assert result.returncode != 0
  assert json.loads(result.stdout.strip().splitlines()[-1])["written"] == 0


def test_load_image_flattens_alpha_and_reencodes_other_formats(tmp_path):
  rgba = Image.new("RGBA", (100, 80), (0, 0, 255, 0))
  rgba.save(tmp_path / "clear.png")
  out = Image.open(io.BytesIO(jsonl_to_shards.load_image(str(tmp_path / "clear.png"), 32)))
  assert out.format == "JPEG" and out.mode == "RGB" and out.size == (40, 32)
  assert np.asarray(out).min() > 240  # Fully transparent -> white.
  Image.new("P", (10, 10)).save(tmp_path / "x.gif")
  gif = jsonl_to_shards.load_image(str(tmp_path / "x.gif"), None)
  assert Image.open(io.BytesIO(gif)).format == "JPEG"


def test_too_many_bad_lines_write_nothing_and_name_the_commonest_reason(jsonl, tmp_path):
  """The training policy for bad data, at conversion: skip and count, but past the allowed
  fraction (the default is training's 0.05; the fixture has 4 of 8 bad) publish nothing."""
  out = tmp_path / "out"
  with pytest.raises(jsonl_to_shards.SkipFractionError, match=r"4 of 8 lines.*max_skip_fraction=0.4"):
    jsonl_to_shards.convert(jsonl, out, num_workers=1, max_skip_fraction=0.4)
  assert not list(out.glob("*.array_record")) and not shard_writer.read_manifest(out)
  result = _cli(f"--input={jsonl}", f"--output_dir={out}", "--num_workers=1")
  assert result.returncode == 1
  assert "max_skip_fraction=0.05" in result.stderr and "mostly 'empty caption'" in result.stderr
  assert "Traceback" not in result.stderr
  assert json.loads(result.stdout.strip().splitlines()[-1])["written"] == 0
