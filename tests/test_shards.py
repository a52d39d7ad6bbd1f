"""Real shards at scale: the training index comes from the manifest (no shard opened at start-up), at
most `max_open_shards` files are open at any time, and 10,000 shards start and resume within the
budget of 100 shards of the same records."""

import io
import json
import logging
import os
import resource
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from conftest import REPO


def _png(i: int) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (8, 8), (i * 37 % 256, i * 91 % 256, i * 53 % 256)).save(buf, format="PNG")
  return buf.getvalue()


def write_shards(directory, num_records: int, num_shards: int, manifest: bool = True) -> list[str]:
  """`num_records` image-caption records over `num_shards` shards (and their manifest)."""
  from bigvl.data.formats import records
  from data_pipelines import shard_writer
  os.makedirs(directory, exist_ok=True)
  images = [_png(i) for i in range(16)]
  infos = []
  for k, (lo, hi) in enumerate(shard_writer.shard_ranges(num_records, num_shards)):
    name = shard_writer.shard_filename("train", k, num_shards)
    infos.append(shard_writer.write_shard(os.path.join(directory, name), (
        records.encode_record({"id": i, "image": images[i % 16], "caption": f"record {i}"})
        for i in range(lo, hi))))
  if manifest:
    shard_writer.write_json(os.path.join(directory, shard_writer.MANIFEST),
                            {"format": "test", "splits": {"train": shard_writer.split_entry(infos)}})
  return sorted(os.path.join(directory, i.file) for i in infos)


def _stream(files, max_open=8, **kw):
  from bigvl.data.formats import image_text
  from test_pipeline_processes import ByteTokenizer
  return iter(image_text.train_dataset(files, tokenizer=ByteTokenizer(), image_size=8, batch_size=8,
                                       seed=0, max_open_shards=max_open, **kw))


def _open_shard_fds(directory) -> int:
  n = 0
  for fd in os.listdir("/proc/self/fd"):
    try:
      n += os.readlink(f"/proc/self/fd/{fd}").startswith(str(directory))
    except OSError:
      pass
  return n


def test_the_source_keeps_at_most_max_open_readers_and_reads_every_record(tmp_path):
  import threading
  from bigvl.data import shards
  from data_pipelines import shard_writer
  files = write_shards(tmp_path / "s", 200, 20)
  good, counts, bad = shards.count_records(files)
  assert good == files and sum(counts) == 200 and bad == []
  src = shards.ShardSource(good, counts, max_open=3)
  want = [r for f in files for r in shard_writer.read_records(f)]
  order = np.random.default_rng(0).permutation(200)
  peak = [0]
  got = {}

  def read(part):
    for i in part:
      got[int(i)] = src[int(i)]
      peak[0] = max(peak[0], src.open_readers(), _open_shard_fds(tmp_path / "s"))
  threads = [threading.Thread(target=read, args=(p,)) for p in np.array_split(order, 8)]
  [t.start() for t in threads]
  [t.join() for t in threads]
  assert [got[i] for i in range(200)] == want
  assert 1 <= peak[0] <= 3 and src.opened > 3   # readers were closed and reopened
  src.close()
  assert _open_shard_fds(tmp_path / "s") == 0


def test_start_up_opens_no_shard_with_a_manifest_and_counts_without_one(tmp_path, monkeypatch,
                                                                       caplog):
  from bigvl.data import shards
  files = write_shards(tmp_path / "s", 64, 8)
  opened = []
  real = shards._open
  monkeypatch.setattr(shards, "_open", lambda p: opened.append(p) or real(p))
  _stream(files)
  assert opened == []
  os.remove(tmp_path / "s" / "manifest.json")
  with caplog.at_level(logging.WARNING):
    it = _stream(files)
  assert len(opened) == 8 and "write one with `python launch/build_shards.py --write_manifest" in (
      caplog.text)
  assert next(it)["id"].shape == (8,)


def test_a_shard_cut_short_is_left_out_by_its_size(tmp_path, caplog):
  from bigvl.data import shards
  files = write_shards(tmp_path / "s", 64, 8)
  os.truncate(files[3], os.path.getsize(files[3]) // 2)
  with caplog.at_level(logging.WARNING):
    good, counts, bad = shards.count_records(files)
  assert bad == [files[3]] and len(good) == 7 and "its manifest says" in caplog.text


def test_write_manifest_for_shards_made_elsewhere(tmp_path):
  from data_pipelines import shard_writer
  files = write_shards(tmp_path / "s", 30, 3, manifest=False)
  out = subprocess.run([sys.executable, "launch/build_shards.py", f"--write_manifest={tmp_path / 's'}",
                        "--num_workers=1"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(out.stdout.splitlines()[-1])["splits"] == {"train": {"shards": 3, "records": 30}}
  entry = shard_writer.read_manifest(tmp_path / "s")["splits"]["train"]
  assert [s["num_records"] for s in entry["shards"]] == [10, 10, 10]
  assert [s["num_bytes"] for s in entry["shards"]] == [os.path.getsize(f) for f in files]


def _rss() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * resource.getpagesize()


def measure(directory: str, max_open: int = 8) -> dict:
  """Start-up, 20 batches, state, resume: time, traced and resident memory, open shard files."""
  import glob
  files = sorted(glob.glob(os.path.join(directory, "*.array_record")))
  from bigvl.data.formats import image_text  # noqa: F401  (imports are not what is measured)
  from test_pipeline_processes import ByteTokenizer  # noqa: F401
  rss0 = _rss()
  tracemalloc.start()
  t = time.perf_counter()
  it = _stream(files, max_open)
  first = next(it)["id"].tolist()
  out = {"startup_s": time.perf_counter() - t, "shards": len(files)}
  fds = _open_shard_fds(directory)
  for _ in range(19):
    next(it)
    fds = max(fds, _open_shard_fds(directory))
  state = it.get_state()
  out["state_bytes"] = len(json.dumps(state).encode())
  want = next(it)["id"].tolist()
  t = time.perf_counter()
  again = _stream(files, max_open)
  again.set_state(state)
  assert next(again)["id"].tolist() == want
  out["resume_s"] = time.perf_counter() - t
  out["traced_peak_bytes"] = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  out["rss_growth_bytes"] = _rss() - rss0
  out["max_open_shard_files"] = fds
  out["first_ids"] = first
  return out


STARTUP_S, RESUME_S = 3.0, 3.0
TRACED_BYTES, RSS_BYTES = 16 * 2**20, 96 * 2**20


@pytest.fixture(scope="module")
def two_layouts(tmp_path_factory):
  root = tmp_path_factory.mktemp("layouts")
  write_shards(root / "s100", 20_000, 100)
  write_shards(root / "s10000", 20_000, 10_000)
  return root


def test_ten_thousand_shards_cost_what_a_hundred_do(two_layouts):
  """Each layout measured in a fresh process, so neither inherits the other's allocations."""
  figures = {}
  for name in ("s100", "s10000"):
    out = subprocess.run([sys.executable, __file__, str(two_layouts / name)], cwd=REPO,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": os.path.dirname(__file__)})
    assert out.returncode == 0, out.stderr[-3000:]
    figures[name] = json.loads(out.stdout.splitlines()[-1])
  print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "first_ids"}
                    for k, v in figures.items()}))
  for name, f in figures.items():
    assert f["startup_s"] < STARTUP_S and f["resume_s"] < RESUME_S, (name, f)
    assert f["traced_peak_bytes"] < TRACED_BYTES and f["rss_growth_bytes"] < RSS_BYTES, (name, f)
    assert f["max_open_shard_files"] <= 8, (name, f)
    assert f["state_bytes"] < 2048, (name, f)
  assert figures["s100"]["state_bytes"] == figures["s10000"]["state_bytes"]


if __name__ == "__main__":
  sys.path.insert(0, REPO)
  print(json.dumps(measure(sys.argv[1])))
