"""BM-6B scale: the training stream over 6·10⁹ (virtual) records starts, shuffles globally and resumes
within the same fixed memory and time budget as over 10⁶ records.

Nothing in the stream is per record: the shard index holds one count per shard, the global shuffle is
a keyed permutation of the record index (grain's index_shuffle, a block cipher), and the iterator
state is a position. Each size is measured in a fresh process (`python tests/test_billion_records.py
N` prints the figures), so that neither inherits the other's allocations.
"""

import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc

import pytest

SIZES = (10**6, 6 * 10**9)
SHARDS = 4096
MANY_SHARDS = 600_000   # BM-6B's 6·10⁹ records in shards of 10,000, as a manifest would list them
BATCH = 8
# Budgets for each size: orders of magnitude below what anything per record would cost at 6·10⁹
# (one byte per record is 6 GB; one microsecond per record is 100 minutes).
STARTUP_S, READ_S, RESUME_S = 5.0, 5.0, 2.0
TRACED_BYTES, RSS_BYTES = 16 * 2**20, 64 * 2**20


def _rss() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * resource.getpagesize()


def measure(num_records: int, num_shards: int = SHARDS) -> dict:
  """Start-up, 20 shuffled batches, checkpoint state, resume there and 3 epochs in."""
  from bigvl.data import sources
  from bigvl.data.formats import image_text
  from bigvl.data.stream import resume_state
  from test_pipeline_processes import ByteTokenizer

  def stream():
    return iter(image_text.train_dataset(
        source, tokenizer=ByteTokenizer(),
        image_size=8, batch_size=BATCH, seed=0))

  rss0 = _rss()
  tracemalloc.start()
  t = time.perf_counter()
  source = sources.VirtualSource.uniform(num_records, num_shards)   # the counts: all it holds
  it = stream()
  ids = next(it)["id"].tolist()
  out = {"startup_s": time.perf_counter() - t}
  t = time.perf_counter()
  for _ in range(19):
    ids += next(it)["id"].tolist()
  out["read_s"] = time.perf_counter() - t
  state = it.get_state()
  out["state_bytes"] = len(json.dumps(state).encode())
  want = next(it)["id"].tolist()
  t = time.perf_counter()
  again = stream()
  again.set_state(state)
  out["resume_ok"] = next(again)["id"].tolist() == want
  out["resume_s"] = time.perf_counter() - t
  # Far into the run: global batch 3 epochs + 5 in (past 2³² records at 6·10⁹), no replay.
  t = time.perf_counter()
  far = stream()
  far.set_state(resume_state(far.get_state(), 3 * num_records // BATCH + 5, BATCH))
  out["far_ids"] = next(far)["id"].tolist()
  out["far_resume_s"] = time.perf_counter() - t
  out["traced_peak_bytes"] = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  out["rss_growth_bytes"] = _rss() - rss0
  out["ids"] = ids
  return out


def _measure_in_subprocess(num_records: int, num_shards: int = SHARDS) -> dict:
  here = os.path.dirname(os.path.abspath(__file__))
  r = subprocess.run([sys.executable, os.path.abspath(__file__), str(num_records), str(num_shards)],
                     cwd=here,
                     env={**os.environ, "PYTHONPATH": os.path.dirname(here)},
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_six_billion_records_cost_what_a_million_do():
  small, big = (_measure_in_subprocess(n) for n in SIZES)
  for n, m in zip(SIZES, (small, big)):
    figures = {k: v for k, v in m.items() if not k.endswith("ids")}
    assert m["startup_s"] < STARTUP_S and m["read_s"] < READ_S, (n, figures)
    assert m["resume_s"] < RESUME_S and m["far_resume_s"] < RESUME_S, (n, figures)
    assert m["traced_peak_bytes"] < TRACED_BYTES and m["rss_growth_bytes"] < RSS_BYTES, (n, figures)
    assert m["resume_ok"], n
    # A global shuffle: 160 distinct records from all over the index, not a prefix or one shard.
    ids = m["ids"] + m["far_ids"]
    assert len(set(ids)) == len(ids) and all(0 <= i < n for i in ids), n
    assert min(ids) < n // 10 and max(ids) > n - n // 10, n
  assert any(i >= 2**32 for i in big["ids"])
  # The checkpointed position is a position: the same bytes whatever the record count.
  assert big["state_bytes"] == small["state_bytes"]
  # What 6·10⁹ records add to Python's allocations: nothing that scales (well under 1 byte/1000).
  assert big["traced_peak_bytes"] < small["traced_peak_bytes"] + 2**20


def test_six_billion_records_in_600000_shards_index_in_a_few_megabytes():
  """A manifest-only index (600,000 record counts, no files): positions map to (shard, record),
  the shuffle and the resume work, and what the shards add is their counts' few bytes each."""
  from bigvl.data import sources
  m = _measure_in_subprocess(6 * 10**9, MANY_SHARDS)
  figures = {k: v for k, v in m.items() if not k.endswith("ids")}
  print("600,000 shards:", figures)
  assert m["resume_ok"], figures
  assert m["startup_s"] < STARTUP_S and m["far_resume_s"] < RESUME_S, figures
  # Two int64 arrays of 600,000 (the sizes and their running sum): 9.6 MB, and nothing else.
  assert m["traced_peak_bytes"] < 16 * 2**20 and m["rss_growth_bytes"] < RSS_BYTES, figures
  index = sources.ShardIndex([10_000] * MANY_SHARDS)
  assert index.locate(0) == (0, 0) and index.locate(6 * 10**9 - 1) == (MANY_SHARDS - 1, 9_999)
  assert index.locate(123_456_789_012 % (6 * 10**9)) == divmod(123_456_789_012 % (6 * 10**9),
                                                              10_000)
  ids = m["ids"] + m["far_ids"]
  assert len(set(ids)) == len(ids) and max(ids) > 2**32


def test_the_global_shuffle_is_a_permutation_beyond_two_to_the_32():
  import grain
  n = 30_011
  assert sorted(grain.MapDataset.range(n).shuffle(seed=5)[i] for i in range(n)) == list(range(n))
  big = grain.MapDataset.range(6 * 10**9).shuffle(seed=5)
  sample = [big[i] for i in range(0, 6 * 10**9, 6 * 10**9 // 20_000)]
  assert len(set(sample)) == len(sample) and all(0 <= x < 6 * 10**9 for x in sample)
  assert sum(x >= 2**32 for x in sample) > len(sample) // 10  # the top bits are used


if __name__ == "__main__":
  result = measure(int(sys.argv[1]), *(int(a) for a in sys.argv[2:3]))
  print(json.dumps(result))
