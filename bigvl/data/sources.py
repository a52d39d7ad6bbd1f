"""Record sources by global index that cost nothing per record: the shard index and a virtual source.

A training set of billions of records (BM-6B: about 6·10⁹ pairs) is addressed through per-shard record
counts only, so an index over it costs O(shards) memory and O(log shards) per look-up, never O(records).
`VirtualSource` is such a set without the bytes: records made from their index on demand, for testing
and benchmarking the input pipeline at full scale (start-up, global shuffle, resume) on any machine.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image

from bigvl.data.formats import records


class ShardIndex:
  """Global record index ↔ (shard, position in the shard), from the shards' record counts."""

  def __init__(self, counts: Sequence[int] | np.ndarray):
    counts = np.asarray(counts, np.int64)
    if counts.ndim != 1 or (counts < 0).any():
      raise ValueError("counts: one non-negative record count per shard")
    self.ends = np.cumsum(counts)  # int64: room for 9·10¹⁸ records

  def __len__(self) -> int:
    return int(self.ends[-1]) if len(self.ends) else 0

  @property
  def num_shards(self) -> int:
    return len(self.ends)

  def locate(self, index: int) -> tuple[int, int]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} not in [0, {len(self)})")
    shard = int(np.searchsorted(self.ends, index, side="right"))
    return shard, index - (int(self.ends[shard - 1]) if shard else 0)


def _png(rgb: tuple[int, int, int], size: int) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (size, size), rgb).save(buf, format="PNG")
  return buf.getvalue()


class VirtualSource:
  """`len(shard_sizes)` shards of records made on demand: record i has id i, one of 16 plain-colour
  PNG images and the caption "record <position> of shard <shard>". Random access like
  `grain.sources.ArrayRecordDataSource`; every record decodes."""

  def __init__(self, shard_sizes: Sequence[int] | np.ndarray, *, image_size: int = 8):
    self.index = ShardIndex(shard_sizes)
    rng = np.random.default_rng(0)
    self._images = [_png(tuple(int(c) for c in rng.integers(0, 256, 3)), image_size)
                    for _ in range(16)]

  @classmethod
  def uniform(cls, num_records: int, num_shards: int, **kwargs) -> "VirtualSource":
    """`num_records` split over `num_shards` shards whose sizes differ by at most one."""
    sizes = np.full(num_shards, num_records // num_shards, np.int64)
    sizes[:num_records % num_shards] += 1
    return cls(sizes, **kwargs)

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, index: int) -> bytes:
    shard, position = self.index.locate(index)
    index = int(index)
    return records.encode_record({
        "id": index, "image": self._images[(index * 2654435761 >> 7) % 16],
        "caption": f"record {position} of shard {shard}", "meta": {"shard": shard}})

  def __repr__(self) -> str:
    return f"VirtualSource({len(self):,} records in {self.index.num_shards:,} shards)"
